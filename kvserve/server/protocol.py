"""The OpenAI wire format (pydantic): requests with their SamplingParams, responses, chunks, errors."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from pydantic_core import PydanticSerializationError, to_json

from kvserve.sampling_params import SamplingParams

MAX_N = 16  # samples per prompt: each is a sequence in the batch, so this bounds one request's share
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings are searched after every token
# Characters of one stop string: the text is searched for it after every token, and a stream holds back up to
# that many characters in case they begin a stop string.
MAX_STOP_CHARS = 1024
MAX_TOP_LOGPROBS = 20
_INT64 = 2**63


class FieldError(ValueError):
    """A request field is invalid; `param` is its path inside the model that raised (`content[0].text`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def has_lone_surrogate(value: object) -> bool:
    """Whether a string under `value` cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800").

    One pass of pydantic-core's JSON encoder, which refuses such strings (tens of ms for a million ints).
    """
    try:
        to_json(value)
    except PydanticSerializationError as error:
        return "surrogates not allowed" in str(error)
    return False


def lone_surrogate_path(value: object, path: str) -> str | None:
    """The path of the first string under `value` that UTF-8 cannot encode; only called once one is known."""
    if isinstance(value, str):
        return path if not value.isascii() and has_lone_surrogate(value) else None
    if isinstance(value, BaseModel):
        items = [(f"{path}.{name}", getattr(value, name)) for name in type(value).model_fields]
    elif isinstance(value, dict):  # free-form JSON (a schema, tool arguments): keys are strings too
        items = [(f"{path} key", key) for key in value] + [(f"{path}.{key}", item) for key, item in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value) if not isinstance(item, int | float)]
    else:
        return None
    return next((found for sub, item in items if (found := lone_surrogate_path(item, sub)) is not None), None)


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    # Strict: "0.5" is not a number and true is not 1, as with OpenAI; unknown fields are ignored
    # because clients send ones we have no use for (tools, response_format, ...).
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="after")
    def _encodable_as_utf8(self) -> _Request:
        # JSON may escape a lone surrogate ("\ud800") that no tokenizer can encode: refuse it by name.
        if not has_lone_surrogate(self):
            return self
        for name in type(self).model_fields:
            path = lone_surrogate_path(getattr(self, name), name)
            if path is not None:
                raise FieldError(path, f"{path} is not valid Unicode: it holds a lone surrogate code point")
        return self


class StreamOptions(_Request):
    """`stream_options`: whether a last chunk carries the usage."""

    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by chat and completions; ranges are checked by SamplingParams, the one source."""

    model: str | None = None
    # Ranges in json_schema_extra only document what SamplingParams checks (its errors name the field).
    temperature: float | None = Field(None, json_schema_extra={"minimum": 0})
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    n: int = Field(1, le=MAX_N, json_schema_extra={"minimum": 1})
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)  # the range torch generators accept
    presence_penalty: float = Field(0.0, json_schema_extra={"minimum": -2, "maximum": 2})
    frequency_penalty: float = Field(0.0, json_schema_extra={"minimum": -2, "maximum": 2})
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras, sent by clients through `extra_body`.
    top_k: int = Field(-1, lt=_INT64, json_schema_extra={"minimum": -1})
    min_p: float = Field(0.0, json_schema_extra={"minimum": 0, "maximum": 1})
    repetition_penalty: float = Field(1.0, json_schema_extra={"exclusiveMinimum": 0})
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=256)
    min_tokens: int = Field(0, lt=_INT64, json_schema_extra={"minimum": 0})
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams of this request; raises ValueError naming the field out of range."""
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
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


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


# OpenAI chat fields that would change the answer and that this server does not implement: refused with a 400
# rather than ignored. Harmless ones (user, store, metadata, service_tier, parallel_tool_calls) are ignored.
UNSUPPORTED_CHAT_FIELDS = {
    "functions": "use tools",
    "function_call": "use tool_choice",
    "audio": "this server answers with text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "this server does not search the web",
}


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "n": 2,
         "max_completion_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
         "top_logprobs": 2, "stop": ["\n\n"]},
    ]})

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, hint in UNSUPPORTED_CHAT_FIELDS.items():
                if data.get(name) is not None:
                    raise FieldError(name, f"{name} is not supported: {hint}")
            modalities = data.get("modalities")
            if modalities is not None and modalities != ["text"]:
                raise FieldError("modalities", 'modalities must be ["text"]: this server answers with text only')
        return data

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, lt=_INT64, json_schema_extra={"minimum": 1})
    max_completion_tokens: int | None = Field(None, lt=_INT64, json_schema_extra={"minimum": 1})
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def max_tokens_field(self) -> str:
        """The name of the length limit the client used, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling_params(self) -> SamplingParams:
        """SamplingParams; no length limit means the rest of the context window."""
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

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Say this is a test", "max_tokens": 7, "temperature": 0},
        {"prompt": ["Once upon a time", "The capital of France is"], "n": 2, "max_tokens": 3, "logprobs": 2,
         "stream": True, "stream_options": {"include_usage": True}, "seed": 1},
        {"prompt": [1, 2, 3], "max_tokens": 2, "echo": False},
    ]})

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, lt=_INT64, json_schema_extra={"minimum": 1})
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

    def sampling_params(self) -> SamplingParams:
        """SamplingParams of this request; raises ValueError naming the field."""
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self._sampling_params(self.max_tokens, self.logprobs)


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
    """`logprobs` of a completion choice (the legacy shape)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


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


class CompletionResponse(_Response):
    """A whole completion, or a chunk of a completion stream."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class HealthStatus(BaseModel):
    """GET /health: "ok", or "draining" (with 503) while shutting down."""

    status: Literal["ok", "draining"]


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
