"""Tool calling over HTTP: tools in the prompt, tool_calls in responses and stream deltas, tool_choice, errors.

Most tests use a fake engine that replies a scripted text (tool_harness.ScriptedEngine) through the official
`openai` client; the last ones run the bundled model (`live`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI
from serve_harness import ThreadedServer, assert_openai_error
from tool_harness import ScriptedEngine

from kvserve.engine.async_engine import AsyncEngine
from kvserve.sampling_params import SamplingParams
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

WEATHER_PARAMETERS = {"type": "object",
                      "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                      "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                            "parameters": WEATHER_PARAMETERS}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris for 2 days, and 2 + 3?"}]
TWO_CALLS = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
             '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')
# With the structured-output branch merged, SamplingParams has the field and the engine honours it.
STRUCTURED = "structured_outputs" in {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedEngine, str]]:
    engine = ScriptedEngine()
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    with ThreadedServer(build_app(async_engine, metrics, ServerConfig(served_model_name="fake"))) as server:
        yield engine, server.url
    async_engine.shutdown()


def client_of(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def whole(url: str, **kwargs: Any) -> Any:
    return client_of(url).chat.completions.create(model="fake", messages=ASK, tools=TOOLS, **kwargs)


def assembled(url: str, **kwargs: Any) -> tuple[str | None, list[dict[str, str]], str, list[Any]]:
    """A stream put back together as a client does: (content, calls, finish_reason, the deltas)."""
    content, calls, finish, deltas = "", {}, None, []
    for chunk in client_of(url).chat.completions.create(model="fake", messages=ASK, tools=TOOLS, stream=True,
                                                         **kwargs):
        choice = chunk.choices[0]
        deltas.append(choice.delta)
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            if piece.index not in calls:  # the call's first piece: id, type and name
                assert piece.id.startswith("call_") and piece.type == "function" and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and piece.function.name is None
            calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish, deltas


def calls_of(message: Any) -> list[dict[str, str]]:
    return [{"name": call.function.name, "arguments": call.function.arguments} for call in message.tool_calls or []]


def test_auto_parses_calls_out_of_the_reply(scripted) -> None:
    engine, url = scripted
    engine.script = TWO_CALLS
    choice = whole(url).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    assert calls_of(choice.message) == [{"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                                        {"name": "add", "arguments": '{"a": 2, "b": 3}'}]
    ids = [call.id for call in choice.message.tool_calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert all(call.type == "function" for call in choice.message.tool_calls)


@pytest.mark.parametrize("piece_size", [1, 4, 11])
@pytest.mark.parametrize("script", [TWO_CALLS, '{"name": "add", "arguments": {"a": 1, "b": 2}}',
                                    'No call: <tool_call>{"name": "rm", "arguments": {}}</tool_call> x < 1'])
def test_stream_deltas_reassemble_to_the_whole_response(scripted, script: str, piece_size: int) -> None:
    engine, url = scripted
    engine.script, engine.piece_size = script, piece_size
    try:
        expected = whole(url).choices[0]
        content, calls, finish, deltas = assembled(url)
    finally:
        engine.piece_size = 3
    assert content == expected.message.content and finish == expected.finish_reason
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls] == calls_of(expected.message)
    if calls:  # no piece of a tag ever shows as content
        assert all("<" not in (delta.content or "") for delta in deltas)


def test_stream_chunks_have_openai_shape(scripted) -> None:
    engine, url = scripted
    engine.script = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    body = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "fake", "messages": ASK, "tools": TOOLS, "stream": True}).text
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    deltas = [event["choices"][0]["delta"] for event in events]
    calls = [delta["tool_calls"][0] for delta in deltas if "tool_calls" in delta]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert set(calls[0]) == {"index", "id", "type", "function"} and calls[0]["function"]["name"] == "add"
    assert all(set(call) == {"index", "function"} and set(call["function"]) == {"arguments"} for call in calls[1:])
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}


def test_reply_without_calls_is_plain_content(scripted) -> None:
    engine, url = scripted
    engine.script = "Paris is sunny."
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": "fake", "messages": ASK, "tools": TOOLS}).json()
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "Paris is sunny."}
    assert response["choices"][0]["finish_reason"] == "stop"


def test_tool_choice_none_offers_no_tools_and_parses_nothing(scripted) -> None:
    engine, url = scripted
    engine.script = TWO_CALLS
    response = whole(url, tool_choice="none")
    assert response.choices[0].message.tool_calls is None and response.choices[0].message.content == TWO_CALLS
    assert "get_weather" not in engine.prompt_text(response.id)
    assert getattr(engine.params[response.id], "structured_outputs", None) is None


def test_auto_prompt_offers_the_tools_through_the_fallback(scripted) -> None:
    engine, url = scripted
    engine.script = "ok"
    response = whole(url)
    prompt = engine.prompt_text(response.id)
    assert prompt.startswith("<|im_start|>system\n# Tools\n")  # the block replaces the default system prompt
    for tool in TOOLS:
        assert json.dumps(tool) in prompt
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt
    assert prompt.endswith(f"<|im_start|>user\n{ASK[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert getattr(engine.params[response.id], "structured_outputs", None) is None  # auto: free text


def test_history_with_tool_calls_and_results_reaches_the_prompt(scripted) -> None:
    engine, url = scripted
    engine.script = "It is sunny."
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
                   {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 18 C"},
               {"role": "tool", "tool_call_id": "call_2", "content": "5"}]
    response = client_of(url).chat.completions.create(model="fake", messages=history, tools=TOOLS)
    assert response.choices[0].message.content == "It is sunny."
    prompt = engine.prompt_text(response.id)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\n{"name": "get_weather", "content": "sunny, 18 C"}\n</tool_response>\n'
            '<tool_response>\n{"name": "add", "content": "5"}\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in prompt


def test_a_reply_message_goes_back_into_the_history_as_clients_send_it(scripted) -> None:
    engine, url = scripted
    engine.script = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    client = client_of(url)
    first = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS).choices[0].message
    call = first.tool_calls[0]
    engine.script = "5."
    history = [*ASK, first, {"role": "tool", "tool_call_id": call.id, "content": "5"}]  # the SDK's own object
    second = client.chat.completions.create(model="fake", messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "5."
    assert ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
            '<tool_response>\n{"name": "add", "content": "5"}\n</tool_response>') in engine.prompt_text(second.id)


def test_named_function_is_constrained_to_its_schema_and_wrapped_as_a_call(scripted) -> None:
    engine, url = scripted
    engine.script = '{"city": "Rome", "days": 3}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = whole(url, tool_choice=named)
    assert engine.params[response.id].structured_outputs.json == WEATHER_PARAMETERS
    message = response.choices[0].message
    assert message.content is None and calls_of(message) == [{"name": "get_weather", "arguments": engine.script}]
    assert response.choices[0].finish_reason == "tool_calls"
    content, calls, finish, _ = assembled(url, tool_choice=named)
    assert (content, finish) == (None, "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", engine.script)]


def test_required_is_constrained_to_an_array_of_declared_calls(scripted) -> None:
    engine, url = scripted
    engine.script = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "get_weather", "parameters": ' \
                    '{"city": "Oslo", "days": 1}}]'
    response = whole(url, tool_choice="required")
    schema = engine.params[response.id].structured_outputs.json
    jsonschema.validate(json.loads(engine.script), schema)
    for wrong in ([], [{"name": "rm", "parameters": {}}], [{"name": "get_weather", "parameters": {"city": "Nice"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    assert calls_of(response.choices[0].message) == [
        {"name": "add", "arguments": '{"a": 1, "b": 2}'},
        {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}]
    assert assembled(url, tool_choice="required")[1][1]["arguments"] == '{"city": "Oslo", "days": 1}'
    single = whole(url, tool_choice="required", parallel_tool_calls=False)
    assert engine.params[single.id].structured_outputs.json["maxItems"] == 1


def _tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": function}


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [_tool("add"), _tool("add")]}, "tools"),
    ({"tools": [_tool("has space")]}, "tools[0].function.name"),
    ({"tools": [_tool("x" * 65)]}, "tools[0].function.name"),
    ({"tools": [_tool("add", {"type": "string"})]}, "tools[0].function.parameters"),
    ({"tools": [_tool("add", [1])]}, "tools[0].function.parameters"),
    ({"tools": [_tool(f"f{i}") for i in range(129)]}, "tools"),
    ({"tools": [{"type": "retrieval", "function": {"name": "add"}}]}, "tools[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "add"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tools_are_400_naming_the_field(scripted, extra: dict[str, Any], param: str) -> None:
    _, url = scripted
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "fake", "messages": ASK, **extra}, timeout=60)
    assert_openai_error(response, 400, param)


# ---- the bundled model ---------------------------------------------------------------------------


def test_bundled_model_history_prompt_holds_calls_and_results(live) -> None:
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_9", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]
    expected = [history[0],
                {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                 '{"city": "Paris"}}\n</tool_call>'},
                {"role": "user", "content": '<tool_response>\n{"name": "get_weather", "content": "sunny"}\n'
                                            "</tool_response>"}]
    text = live.tokenizer.apply_chat_template(expected, tokenize=False, add_generation_prompt=True)
    response = live.client().chat.completions.create(model="smollm2", messages=history, max_tokens=1)
    assert response.usage.prompt_tokens == len(live.tokenizer.encode(text, add_special_tokens=False))


def test_bundled_model_auto_streams_what_it_answers_whole(live) -> None:
    kwargs = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "max_tokens": 24, "temperature": 0}
    expected = live.client().chat.completions.create(**kwargs).choices[0]
    content, calls = "", {}
    for chunk in live.client().chat.completions.create(stream=True, **kwargs):
        for piece in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            calls.setdefault(piece.index, [piece.function.name, ""])[1] += piece.function.arguments or ""
        content += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert (content or None) == expected.message.content
    assert [tuple(calls[i]) for i in sorted(calls)] == [(c["name"], c["arguments"]) for c in calls_of(expected.message)]


@pytest.mark.skipif(not STRUCTURED, reason="needs the structured-output branch (SamplingParams.structured_outputs)")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bundled_model_forced_calls_always_follow_the_schema(live, seed: int) -> None:
    client = live.client()
    kwargs = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "max_tokens": 96, "temperature": 1.0, "seed": seed}
    named = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           **kwargs).choices[0]
    assert [call.function.name for call in named.message.tool_calls] == ["get_weather"]
    jsonschema.validate(json.loads(named.message.tool_calls[0].function.arguments), WEATHER_PARAMETERS)
    required = client.chat.completions.create(tool_choice="required", **kwargs).choices[0]
    assert required.message.tool_calls and required.finish_reason == "tool_calls"
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for call in required.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
