"""The OpenAI wire format (pydantic): requests with their SamplingParams, responses, chunks, errors."""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator
from pydantic_core import PydanticSerializationError, to_json

from kvserve.sampling_params import MAX_LOGIT_BIAS_ENTRIES, SamplingParams
from kvserve.server.response_format import ResponseFormat, StructuredOutputsRequest, structured_outputs_of
from kvserve.structured.params import StructuredOutputsParams

MAX_N = 16  # samples per prompt: each is a sequence in the batch, so this bounds one request's share
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings are searched after every token
# Characters of one stop string: the text is searched for it after every token, and a stream holds back up to
# that many characters in case they begin a stop string.
MAX_STOP_CHARS = 1024
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128  # each tool's schema is in the prompt (and, for `required`, in the grammar)
_FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
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
        # The wire name (an alias such as json_schema's "schema"), not the attribute's.
        items = [(f"{path}.{info.alias or name}", getattr(value, name))
                 for name, info in type(value).model_fields.items()]
    elif isinstance(value, dict):  # free-form JSON (a schema, tool arguments): keys are strings too
        items = [(f"{path} key", key) for key in value] + [(f"{path}.{key}", item) for key, item in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value) if not isinstance(item, int | float)]
    else:
        return None
    return next((found for sub, item in items if (found := lone_surrogate_path(item, sub)) is not None), None)


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    # Strict: "0.5" is not a number and true is not 1, as with OpenAI. Unknown fields are ignored because
    # clients send harmless ones we have no use for (user, store, metadata); the ones that would change the
    # answer are declared and honoured, or refused by name (_SamplingFields, ChatCompletionRequest).
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
    # {token id (a JSON string): bias in [-100, 100]}, added to the logits (OpenAI).
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    # vLLM V1 dropped best_of: accepted only when it asks for nothing more than `n`.
    best_of: int | None = Field(None, lt=_INT64)
    # vLLM's extra: the prompt tokens' logprobs with this many alternatives, as `prompt_logprobs`.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    structured_outputs: StructuredOutputsRequest | None = None
    response_format: ResponseFormat | None = None  # OpenAI's on chat; accepted on completions too, as vLLM does

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        return self

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


class FunctionCall(_Request):
    """A call's function: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(_Request):
    """A tool call, in an assistant message of the history or of a response."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """The call as chat templates expect it: arguments parsed when they are a JSON object (as vLLM does)."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        if not isinstance(arguments, dict):
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = Field(None, validate_default=True)  # tool messages: the call answered

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_the_assistant(cls, value: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if value is not None and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_results_name_their_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return value

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: a role, plain-text content, and any tool calls / call id."""
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "\n".join(part.text for part in self.content)
        # Templates know the older name of the developer role.
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                message["name"] = self.name
        return message


class FunctionDefinition(_Request):
    """A function the model may call."""

    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object; None: no parameters
    strict: bool | None = None  # accepted: `required` and named calls always follow the schema

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError("must be a JSON schema of type object")
        return value


class ToolDefinition(_Request):
    """An entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    """The function a named `tool_choice` forces."""

    name: str


class NamedToolChoice(_Request):
    """`tool_choice` naming one function of `tools`."""

    type: Literal["function"]
    function: FunctionName


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
    echo: bool = False  # vLLM's extra (echo the last message); not supported here
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [tool.function.name for tool in value or []]
        repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if repeated is not None:
            raise ValueError(f"function names must be distinct; {repeated!r} repeats")
        return value

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
    """The message of a chat choice: content, and tool calls when the model made some."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda calls: calls is None)


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


class DeltaFunctionCall(BaseModel):
    """A piece of a streamed call's function: the name in the call's first chunk, then argument text."""

    name: str | None = Field(None, exclude_if=lambda name: name is None)
    arguments: str = ""


class DeltaToolCall(BaseModel):
    """A piece of call `index`; its first chunk also carries the id and type."""

    index: int
    id: str | None = Field(None, exclude_if=lambda value: value is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda value: value is None)
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    """What a chunk adds to a message: the role first, then content pieces or tool-call pieces."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

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
