"""The OpenAI wire format (pydantic): requests with their SamplingParams, responses, chunks, errors."""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from kvserve.sampling_params import MAX_LOGIT_BIAS_ENTRIES, SamplingParams
from kvserve.server.response_format import ResponseFormat, StructuredOutputsRequest, structured_outputs_of
from kvserve.structured.params import StructuredOutputsParams

MAX_N = 16  # samples per prompt: each is a sequence in the batch, so this bounds one request's share
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings are searched after every token
MAX_TOP_LOGPROBS = 20
_INT64 = 2**63


class _Request(BaseModel):
    # Strict: "0.5" is not a number and true is not 1, as with OpenAI; unknown fields are ignored
    # because clients send ones we have no use for (tools, response_format, ...).
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    """`stream_options`: whether a last chunk carries the usage."""

    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by chat and completions; ranges are checked by SamplingParams, the one source."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, le=MAX_N)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)  # the range torch generators accept
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras, sent by clients through `extra_body`.
    top_k: int = Field(-1, lt=_INT64)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=256)
    min_tokens: int = Field(0, lt=_INT64)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # {token id (a JSON string): bias in [-100, 100]}, added to the logits (OpenAI).
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    # vLLM V1 dropped best_of: accepted only when it asks for nothing more than `n`.
    best_of: int | None = Field(None, lt=_INT64)
    # vLLM's extra: the prompt tokens' logprobs with this many alternatives, as `prompt_logprobs`.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    structured_outputs: StructuredOutputsRequest | None = None
    response_format: ResponseFormat | None = None  # OpenAI's on chat; accepted on completions too, as vLLM does

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams of this request; raises ValueError naming the field out of range."""
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of is not supported (vLLM V1 dropped it): leave it out or set it equal to n "
                             f"({self.n}), got {self.best_of}; ask for n samples instead")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when stream is true")
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            logit_bias=logit_bias_token_ids(self.logit_bias),
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self.structured_outputs_params(),
        )

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The constraint of `response_format` or of the `structured_outputs` extra (not both); None for free
        text (server/response_format.py)."""
        return structured_outputs_of(self.structured_outputs, self.response_format)

    @property
    def structured_outputs_field(self) -> str:
        """The field that carried the output constraint, for error messages."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"


_TOKEN_ID = re.compile(r"[0-9]+")


def logit_bias_token_ids(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias keys are token ids written as JSON strings; SamplingParams checks the rest."""
    if logit_bias is None:
        return None
    for key in logit_bias:
        if not _TOKEN_ID.fullmatch(key):
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
    return {int(key): bias for key, bias in logit_bias.items()}


class TextPart(_Request):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it: a role and plain-text content."""
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "\n".join(part.text for part in self.content)
        # Templates know the older name of the developer role.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, lt=_INT64)
    max_completion_tokens: int | None = Field(None, lt=_INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # vLLM's extra (echo the last message); not supported here

    @property
    def max_tokens_field(self) -> str:
        """The name of the length limit the client used, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling_params(self) -> SamplingParams:
        """SamplingParams; no length limit means the rest of the context window."""
        if self.echo:
            raise ValueError("echo is not supported on chat completions (use /v1/completions)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(limit, logprobs)
        except ValueError as error:
            raise ValueError(str(error).replace("max_tokens", self.max_tokens_field, 1)) from None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, lt=_INT64)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @property
    def max_tokens_field(self) -> str:
        """The name of the length limit, for error messages."""
        return "max_tokens"

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: each a string or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt must hold at most {MAX_PROMPTS} prompts, got {len(prompts)}")
        return prompts

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the answer is the prompt alone (what lm-evaluation-harness sends to score it)."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        """SamplingParams of this request; raises ValueError naming the field."""
        if self.suffix:
            raise ValueError("suffix is not supported")
        # As vLLM: an echo-only request generates one token, which the answer leaves out.
        max_tokens = 1 if self.echo_only else self.max_tokens
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:  # echoed tokens carry logprobs like generated ones
            prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


# ---- responses -----------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    """Where prompt tokens came from: `cached_tokens` were reused from the prefix cache."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # True when the whole answer came from the response cache (--response-cache-size): no token was computed.
    response_cache_hit: bool = False


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """The chosen token at a position, with the alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """`logprobs` of a chat choice."""

    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    """`logprobs` of a completion choice (the legacy shape); with echo the prompt's first token has null ones."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One token of a `prompt_logprobs` position (vLLM's shape); rank is null when not known (outside the top)."""

    logprob: float
    rank: int | None = None
    decoded_token: str


# Per prompt token: null for the first, else {token id: PromptLogprob} (the token itself and the top alternatives).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class AssistantMessage(BaseModel):
    """The message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One generated answer."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class ChatCompletionResponse(_Response):
    """A whole chat answer."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda value: value is None)


class DeltaMessage(BaseModel):
    """What a chunk adds to a message: the role first, then content pieces."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"content": "x"}, and {} in the last chunk.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    """One choice's part of a stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a chat stream."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    """One generated text (also a stream chunk's choice)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda value: value is None)


class CompletionResponse(_Response):
    """A whole completion, or a chunk of a completion stream."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvserve"
    max_model_len: int


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The body of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers: {"error": {...}}."""

    error: ErrorInfo
