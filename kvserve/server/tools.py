"""Tool calling on the chat route: the request's plan, and responses / stream chunks with `tool_calls`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.logprobs import chat_logprobs
from kvserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from kvserve.server.serving import ChatFormatter
from kvserve.structured.params import StructuredOutputsParams
from kvserve.tools.choice import ToolPlan, plan_tools
from kvserve.tools.parser import NamedCallParser, ParsedDelta, ToolCallParser, parse_reply


def tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    """The request's tools and tool_choice as a plan; a ValueError names `tool_choice`."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    return plan_tools(tools, choice, body.parallel_tool_calls)


def constrain(params: SamplingParams, plan: ToolPlan) -> None:
    """Constrain decoding to the plan's JSON schema (`required` and named functions) through structured output."""
    schema = plan.constraint()
    if schema is None:
        return
    if getattr(params, "structured_outputs", None) is not None:
        raise ValueError("tool_choice 'required' or a named function constrains the output itself; "
                         "it cannot be combined with response_format or structured_outputs")
    params.structured_outputs = StructuredOutputsParams(json=schema)


def chat_formatter(plan: ToolPlan, *args: Any, **kwargs: Any) -> ChatFormatter:
    """The chat formatter of a request: one that reads tool calls when the plan parses them."""
    if plan.parser() is None:
        return ChatFormatter(*args, **kwargs)
    return ToolChatFormatter(*args, plan=plan, **kwargs)


def new_call_id() -> str:
    """An id in OpenAI's shape."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolChatFormatter(ChatFormatter):
    """A ChatFormatter that reads tool calls out of each choice's text, whole or as it streams."""

    plan: ToolPlan = field(default_factory=ToolPlan)
    _parsers: dict[int, ToolCallParser | NamedCallParser] = field(default_factory=dict)
    _call_ids: dict[tuple[int, int], str] = field(default_factory=dict)

    def _parser(self, index: int) -> ToolCallParser | NamedCallParser:
        if index not in self._parsers:
            self._parsers[index] = self.plan.parser()
        return self._parsers[index]

    def _finish_reason(self, index: int, reason: str) -> str:
        # A reply that ended by itself after calling tools ends for the calls; a cut-off one stays "length".
        return "tool_calls" if reason == "stop" and self._parser(index).num_calls else reason

    def response(self, outputs: list[RequestOutput]) -> ChatCompletionResponse:
        """A chat.completion whose messages carry the parsed calls (content: the text outside them, or None)."""
        choices = []
        for index, completion in self._completions(outputs):
            parsed = parse_reply(self._parser(index), completion.text)
            calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
                     for call in parsed.calls]
            message = AssistantMessage(content=parsed.content or (None if calls else ""), tool_calls=calls or None)
            logprobs = None
            if self.wants_logprobs:
                logprobs = chat_logprobs(completion.token_ids, completion.logprobs or [],
                                         self.num_top_logprobs, self.token_text)
            choices.append(ChatChoice(index=index, message=message, logprobs=logprobs,
                                      finish_reason=self._finish_reason(index, completion.finish_reason)))
        return ChatCompletionResponse(id=self.response_id, model=self.model, choices=choices,
                                      usage=self._usage(outputs), prompt_logprobs=self._prompt_logprobs(outputs[0]))

    def _delta(self, index: int, completion: CompletionOutput) -> BaseModel | None:
        parser = self._parser(index)
        parsed = parser.feed(completion.delta_text)
        if completion.finish_reason is not None:
            parsed.extend(parser.finish())
        token_ids, logprobs = self._new_logprobs(completion)
        if not parsed and not (self.wants_logprobs and token_ids):
            return None
        delta = DeltaMessage(content=parsed.content or None, tool_calls=self._call_deltas(index, parsed) or None)
        choice = ChatChunkChoice(index=index, delta=delta)
        if self.wants_logprobs:
            choice.logprobs = chat_logprobs(token_ids, logprobs, self.num_top_logprobs, self.token_text)
        return self._chunk([choice])

    def _call_deltas(self, index: int, parsed: ParsedDelta) -> list[DeltaToolCall]:
        """OpenAI's pieces: a call's first names it (id, type, name), the later ones add argument text."""
        deltas = []
        for call in parsed.calls:
            key = (index, call.index)
            first = key not in self._call_ids
            if first:
                self._call_ids[key] = new_call_id()
            deltas.append(DeltaToolCall(index=call.index, id=self._call_ids[key] if first else None,
                                        type="function" if first else None,
                                        function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
        return deltas

    def _finish(self, index: int, reason: str) -> BaseModel:
        return super()._finish(index, self._finish_reason(index, reason))
