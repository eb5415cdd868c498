"""Engine outputs to OpenAI responses: whole answers, and server-sent event streams of chunks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.server.errors import OpenAIError, internal_error
from kvserve.server.logprobs import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    echoed_prompt_logprobs,
    joined,
    vllm_prompt_logprobs,
)
from kvserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    PromptLogprobs,
    PromptTokensDetails,
    Usage,
)

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(message: BaseModel, exclude: set[str] | None = None) -> str:
    """One server-sent event carrying a JSON message."""
    return f"data: {message.model_dump_json(exclude=exclude)}\n\n"


def usage_of(outputs: Iterable[RequestOutput]) -> Usage:
    """Token counts over a request's outputs (one per prompt; `n` samples each)."""
    outputs = list(outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in outputs))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=cached)


def _check(output: RequestOutput) -> None:
    if output.error is not None or any(c.finish_reason == "error" for c in output.outputs):
        raise internal_error(f"the request failed in the engine: {output.error or 'unknown error'}")


class OutputStream(Protocol):
    """A request group's outputs as a transport reads them, from the engine (RequestStream) or a cache."""

    request_ids: list[str]

    def abort(self) -> None:
        """Stop the unfinished requests and free their KV blocks; safe to call twice."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """Outputs as they come, until every request has finished."""


async def collect(stream: OutputStream) -> list[RequestOutput]:
    """Final outputs of a stream's requests, in the order the requests were added."""
    final: dict[str, RequestOutput] = {}
    async for output in stream:
        final[output.request_id] = output
    return [final[request_id] for request_id in stream.request_ids]


@dataclass
class Formatter:
    """Shapes one API request's outputs; `choice_base` maps an engine request to its first choice index."""

    response_id: str
    model: str
    choice_base: dict[str, int]
    token_text: TokenText
    num_top_logprobs: int | None = None  # None: the client did not ask for logprobs
    include_usage: bool = False
    response_cache_hit: bool = False  # the outputs are replayed from the response cache
    num_prompt_logprobs: int | None = None  # vLLM's prompt_logprobs extra; None: not asked for
    _text_offset: dict[int, int] = field(default_factory=dict)

    @property
    def wants_logprobs(self) -> bool:
        """Whether responses carry logprobs."""
        return self.num_top_logprobs is not None

    def _completions(self, outputs: list[RequestOutput]) -> Iterator[tuple[int, CompletionOutput]]:
        """(choice index, completion) of every finished output; a request that failed in the engine raises."""
        for output in outputs:
            _check(output)
            for completion in output.outputs:
                yield self.choice_base[output.request_id] + completion.index, completion

    def response(self, outputs: list[RequestOutput]) -> BaseModel:
        """The whole response of finished outputs; a request that failed in the engine is a 500."""
        raise NotImplementedError

    def _opening(self, indices: list[int]) -> list[BaseModel]:
        return []

    def _on_output(self, output: RequestOutput) -> None:
        """Called with each streamed output before its choices' deltas."""

    def _prompt_logprobs(self, output: RequestOutput) -> PromptLogprobs | None:
        """vLLM's `prompt_logprobs` of an output, when the client asked for them."""
        if self.num_prompt_logprobs is None or output.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(output.prompt_token_ids, output.prompt_logprobs, self.num_prompt_logprobs,
                                    self.token_text)

    def _delta(self, index: int, completion: CompletionOutput) -> BaseModel | None:
        raise NotImplementedError

    def _finish(self, index: int, reason: str) -> BaseModel:
        raise NotImplementedError

    def _usage_chunk(self, usage: Usage) -> BaseModel:
        raise NotImplementedError

    def _chunk_exclude(self) -> set[str] | None:
        return None

    def _new_logprobs(self, completion: CompletionOutput) -> tuple[list[int], list[dict[int, float]]]:
        """The token ids and logprobs this output adds."""
        start = len(completion.token_ids) - len(completion.delta_token_ids)
        return completion.delta_token_ids, (completion.logprobs or [])[start:]

    def _usage(self, outputs: Iterable[RequestOutput]) -> Usage:
        usage = usage_of(outputs)
        usage.response_cache_hit = self.response_cache_hit
        return usage

    async def chunks(self, stream: AsyncIterable[RequestOutput], num_choices: int) -> AsyncIterator[BaseModel]:
        """The chunk objects of a stream: openings, deltas, a finish chunk per choice, then usage if asked.

        Raises what the engine raised; each transport (SSE, WebSocket) decides how to carry the error.
        """
        last: dict[str, RequestOutput] = {}
        finished: set[int] = set()
        for chunk in self._opening(list(range(num_choices))):
            yield chunk
        async for output in stream:
            _check(output)
            last[output.request_id] = output
            self._on_output(output)
            base = self.choice_base[output.request_id]
            for completion in output.outputs:
                index = base + completion.index
                if index in finished:
                    continue
                delta = self._delta(index, completion)
                if delta is not None:
                    yield delta
                if completion.finish_reason is not None:
                    finished.add(index)
                    yield self._finish(index, completion.finish_reason)
        if self.include_usage:
            yield self._usage_chunk(self._usage(last.values()))

    def chunk_json(self, chunk: BaseModel) -> str:
        """A chunk as the wire carries it (SSE data or a WebSocket text frame)."""
        return chunk.model_dump_json(exclude=self._chunk_exclude())

    def stream_error(self, error: Exception) -> OpenAIError:
        """What a stream reports for a failure after it began; logs the unexpected ones."""
        if isinstance(error, OpenAIError):
            return error
        logger.error("stream %s failed", self.response_id, exc_info=error)
        return internal_error(f"internal error: {type(error).__name__}")

    async def stream(self, stream: AsyncIterable[RequestOutput], num_choices: int) -> AsyncIterator[str]:
        """The SSE body: each chunk as an event, an error event if it fails midway, then [DONE]."""
        try:
            async with aclosing(self.chunks(stream, num_choices)) as chunks:
                async for chunk in chunks:
                    yield f"data: {self.chunk_json(chunk)}\n\n"
        except Exception as error:  # headers are sent: the error can only travel as an event
            yield sse(ErrorResponse(error=self.stream_error(error).info))
        yield DONE


class ChatFormatter(Formatter):
    """chat.completion and chat.completion.chunk objects."""

    def response(self, outputs: list[RequestOutput]) -> ChatCompletionResponse:
        """A chat.completion of the (single) finished output."""
        choices = []
        for index, completion in self._completions(outputs):
            logprobs = None
            if self.wants_logprobs:
                logprobs = chat_logprobs(completion.token_ids, completion.logprobs or [],
                                         self.num_top_logprobs, self.token_text)
            choices.append(ChatChoice(index=index, message=AssistantMessage(content=completion.text),
                                      logprobs=logprobs, finish_reason=completion.finish_reason))
        return ChatCompletionResponse(id=self.response_id, model=self.model, choices=choices,
                                      usage=self._usage(outputs), prompt_logprobs=self._prompt_logprobs(outputs[0]))

    def _chunk(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.response_id, model=self.model, choices=choices)

    def _opening(self, indices: list[int]) -> list[BaseModel]:
        # OpenAI opens each choice with the role and empty content.
        return [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in indices]

    def _delta(self, index: int, completion: CompletionOutput) -> BaseModel | None:
        token_ids, logprobs = self._new_logprobs(completion)
        if not completion.delta_text and not (self.wants_logprobs and token_ids):
            return None
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(content=completion.delta_text))
        if self.wants_logprobs:
            choice.logprobs = chat_logprobs(token_ids, logprobs, self.num_top_logprobs, self.token_text)
        return self._chunk([choice])

    def _finish(self, index: int, reason: str) -> BaseModel:
        return self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)])

    def _usage_chunk(self, usage: Usage) -> BaseModel:
        chunk = self._chunk([])
        chunk.usage = usage
        return chunk

    def _chunk_exclude(self) -> set[str] | None:
        # OpenAI sends "usage": null in every chunk only when the client asked for usage.
        return None if self.include_usage else {"usage"}


@dataclass
class CompletionFormatter(Formatter):
    """text_completion objects, whole and as stream chunks; with `echo` each choice starts with the prompt."""

    echo: bool = False
    echo_only: bool = False  # echo with max_tokens 0: the one token generated is left out
    _output: RequestOutput | None = None  # the streamed output whose deltas are being shaped
    _echoed: set[int] = field(default_factory=set)  # choices whose prompt went out

    def response(self, outputs: list[RequestOutput]) -> CompletionResponse:
        """A text_completion of the finished outputs, choices ordered by index."""
        choices = []
        for output in outputs:
            _check(output)
            for completion in output.outputs:
                index = self.choice_base[output.request_id] + completion.index
                text, logprobs = self._echo(index, output)
                if not self.echo_only:
                    text += completion.text
                    logprobs = self._join(logprobs, self._logprobs(index, completion.token_ids,
                                                                   completion.logprobs or []))
                choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                finish_reason=completion.finish_reason,
                                                prompt_logprobs=self._prompt_logprobs(output)))
        choices.sort(key=lambda choice: choice.index)
        return CompletionResponse(id=self.response_id, model=self.model, choices=choices,
                                  usage=self._usage(outputs))
    def _echo(self, index: int, output: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        """The prompt's text and logprobs at the start of a choice: once per choice, only with echo."""
        if not self.echo or index in self._echoed:
            return "", None
        self._echoed.add(index)
        text = output.prompt
        if text is None:  # the prompt came as token ids
            text = self.token_text.tokenizer.decode(output.prompt_token_ids)
        if not self.wants_logprobs:
            return text, None
        offset = self._text_offset.get(index, 0)
        logprobs = echoed_prompt_logprobs(output.prompt_token_ids, output.prompt_logprobs or [],
                                          self.num_top_logprobs, self.token_text, offset)
        self._text_offset[index] = offset + sum(len(token) for token in logprobs.tokens)
        return text, logprobs

    def _logprobs(self, index: int, token_ids: list[int], logprobs: list[dict[int, float]]
                  ) -> CompletionLogprobs | None:
        """Legacy logprobs of generated tokens; offsets continue across chunks, as if the tokens were one list."""
        if not self.wants_logprobs:
            return None
        offset = self._text_offset.get(index, 0)
        result = completion_logprobs(token_ids, logprobs, self.num_top_logprobs, self.token_text, offset)
        self._text_offset[index] = offset + sum(len(token) for token in result.tokens)
        return result

    @staticmethod
    def _join(first: CompletionLogprobs | None, second: CompletionLogprobs | None) -> CompletionLogprobs | None:
        return second if first is None else first if second is None else joined(first, second)

    def _usage(self, outputs: Iterable[RequestOutput]) -> Usage:
        """Usage; an echo-only answer counts no completion tokens (the one generated is not returned)."""
        usage = super()._usage(outputs)
        if self.echo_only:
            usage.total_tokens -= usage.completion_tokens
            usage.completion_tokens = 0
        return usage

    def _chunk(self, choices: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id=self.response_id, model=self.model, choices=choices)

    def _on_output(self, output: RequestOutput) -> None:
        self._output = output

    def _delta(self, index: int, completion: CompletionOutput) -> BaseModel | None:
        # The first chunk of an echoed choice carries the prompt.
        text, logprobs = self._echo(index, self._output)
        if not self.echo_only:
            token_ids, new_logprobs = self._new_logprobs(completion)
            if not text and not completion.delta_text and not (self.wants_logprobs and token_ids):
                return None
            text += completion.delta_text
            logprobs = self._join(logprobs, self._logprobs(index, token_ids, new_logprobs))
        elif not text:
            return None
        return self._chunk([CompletionChoice(index=index, text=text, logprobs=logprobs)])

    def _finish(self, index: int, reason: str) -> BaseModel:
        return self._chunk([CompletionChoice(index=index, text="", finish_reason=reason)])

    def _usage_chunk(self, usage: Usage) -> BaseModel:
        chunk = self._chunk([])
        chunk.usage = usage
        return chunk

    def _chunk_exclude(self) -> set[str] | None:
        return None if self.include_usage else {"usage"}
