"""The reply parser: complete, multiple, bare, array, cut-off and malformed calls; any split gives the same result."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.tools.parser import NamedCallParser, ParsedDelta, ToolCallDelta, ToolCallParser, parse_reply

NAMES = ["get_weather", "add"]
WEATHER = '{"city": "Paris", "days": [1, {"note": "a } and a \\" inside"}]}'


def parse(text: str) -> ParsedDelta:
    return parse_reply(ToolCallParser(NAMES), text)


def streamed(text: str, cuts: list[int]) -> tuple[ParsedDelta, list[ParsedDelta]]:
    """Feed the text cut at `cuts`; (everything merged, the pieces as they came)."""
    parser, pieces, start = ToolCallParser(NAMES), [], 0
    for cut in [*sorted(set(cuts)), len(text)]:
        pieces.append(parser.feed(text[start:cut]))
        start = max(start, cut)
    pieces.append(parser.finish())
    merged = ParsedDelta()
    for piece in pieces:
        merged.extend(piece)
    return merged, pieces


def calls(parsed: ParsedDelta) -> list[tuple[str | None, str]]:
    return [(call.name, call.arguments) for call in parsed.calls]


def test_tagged_call_with_text_before() -> None:
    parsed = parse(f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>')
    assert parsed.content == "Let me check."
    assert calls(parsed) == [("get_weather", WEATHER)]
    assert json.loads(parsed.calls[0].arguments)["days"][1]["note"] == 'a } and a " inside'


def test_several_calls_text_after_and_keys_in_another_order() -> None:
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
            '<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"}</tool_call>\nBoth asked.')
    parsed = parse(text)
    assert calls(parsed) == [("get_weather", '{"city": "Rome"}'), ("add", '{"a": 1, "b": 2}')]
    assert parsed.content == "Both asked."
    assert [call.index for call in parsed.calls] == [0, 1]


def test_bare_object_and_array_of_calls_with_parameters_key() -> None:
    assert calls(parse(' {"name": "add", "parameters": {"a": 1}}')) == [("add", '{"a": 1}')]
    array = '[{"name": "add", "parameters": {"a": 1}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    parsed = parse(array)
    assert calls(parsed) == [("add", '{"a": 1}'), ("get_weather", '{"city": "Oslo"}')] and parsed.content == ""


def test_cut_off_call_keeps_its_partial_arguments() -> None:
    parsed = parse('Sure <tool_call>{"name": "add", "arguments": {"a": 1, "b"')
    assert parsed.content == "Sure" and calls(parsed) == [("add", '{"a": 1, "b"')]


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call> ok',  # not a declared tool
    "<tool_call>not json at all</tool_call>",
    '<tool_call>{"name": "add"}</tool_call>',  # no arguments
    '{"answer": 42}',  # JSON that is not a call
    '{"name": "nope", "arguments": {}}',
    "[1, 2, 3]",
    "x < y and a <tool_ca",  # a tag's start at the end stays text
    "<tool_call>",
])
def test_malformed_calls_stay_content(text: str) -> None:
    parsed = parse(text)
    assert parsed.calls == [] and parsed.content == text.strip()


def test_no_partial_tag_ever_reaches_content() -> None:
    text = 'Checking<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    _, pieces = streamed(text, list(range(len(text))))
    assert "".join(piece.content for piece in pieces) == "Checking"
    assert all("<" not in piece.content for piece in pieces)


def test_first_piece_names_the_call_and_later_pieces_add_arguments() -> None:
    text = '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call>'
    _, pieces = streamed(text, list(range(0, len(text), 3)))
    deltas = [call for piece in pieces for call in piece.calls]
    assert deltas[0] == ToolCallDelta(0, "add", deltas[0].arguments)
    assert all(delta.name is None for delta in deltas[1:]) and len(deltas) > 3  # arguments really stream
    assert "".join(delta.arguments for delta in deltas) == '{"a": 12, "b": 30}'


def test_named_parser_wraps_the_whole_reply() -> None:
    parser = NamedCallParser("add")
    first, second, end = parser.feed('{"a"'), parser.feed(": 1}"), parser.finish()
    assert first.calls == [ToolCallDelta(0, "add", '{"a"')] and second.calls == [ToolCallDelta(0, None, ": 1}")]
    assert not end and parser.num_calls == 1
    assert parse_reply(NamedCallParser("add"), "").calls == [ToolCallDelta(0, "add", "")]


_SAMPLES = [
    f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\nDone.',
    '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call><tool_call>{"name": "add", "arguments": {}}',
    '  [{"name": "add", "parameters": {"a": 1}} , {"name": "get_weather", "parameters": {"city": "x"}}] tail',
    '{"name": "add", "arguments": {"a": "<tool_call>"}}\n{"name": "get_weather", "arguments": {}} end < 3',
    '<tool_call>{"name": "unknown", "arguments": {}}</tool_call> text <tool_call>{"name": "add", "arguments": 7}',
    "plain text with <tool and <tool_call",
]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_SAMPLES), st.lists(st.integers(0, 200), max_size=30))
def test_any_split_gives_the_whole_reply_result(text: str, cuts: list[int]) -> None:
    merged, _ = streamed(text, [cut for cut in cuts if cut <= len(text)])
    assert merged == parse(text)
