"""tool_choice plans: what the prompt offers, the constraint schema, and which parser reads the reply."""

from __future__ import annotations

import jsonschema
import pytest

from kvserve.tools.choice import plan_tools
from kvserve.tools.parser import NamedCallParser, ToolCallParser

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters


def test_default_is_auto_with_tools_and_none_without() -> None:
    auto = plan_tools([ADD], None)
    assert auto.mode == "auto" and auto.prompt_tools == [ADD] and auto.constraint() is None
    assert isinstance(auto.parser(), ToolCallParser)
    empty = plan_tools(None, None)
    assert empty.mode == "none" and empty.prompt_tools is None and empty.parser() is None
    assert plan_tools(None, "auto").mode == "none"


def test_none_hides_the_tools() -> None:
    plan = plan_tools([ADD], "none")
    assert plan.prompt_tools is None and plan.parser() is None and plan.constraint() is None


def test_named_function_is_constrained_to_its_parameters() -> None:
    plan = plan_tools([ADD, PING], {"type": "function", "function": {"name": "add"}})
    assert plan.constraint() == ADD["function"]["parameters"] and isinstance(plan.parser(), NamedCallParser)
    assert plan.prompt_tools == [ADD, PING]
    ping = plan_tools([ADD, PING], {"type": "function", "function": {"name": "ping"}})
    assert ping.constraint() == {"type": "object", "properties": {}}


def test_required_schema_accepts_only_calls_of_declared_tools() -> None:
    schema = plan_tools([ADD, PING], "required").constraint()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate([{"name": "add", "parameters": {"a": 1}}, {"name": "ping", "parameters": {}}], schema)
    for wrong in ([], [{"name": "add", "parameters": {}}], [{"name": "nope", "parameters": {}}],
                  [{"name": "ping", "parameters": {}, "extra": 1}], {"name": "ping", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    single = plan_tools([ADD], "required", parallel_tool_calls=False).constraint()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "parameters": {"a": 1}}] * 2, single)


@pytest.mark.parametrize(("tools", "choice"), [
    ([ADD], {"type": "function", "function": {"name": "sub"}}),
    (None, {"type": "function", "function": {"name": "add"}}),
    (None, "required"),
])
def test_inconsistent_choice_is_an_error_naming_tool_choice(tools, choice) -> None:
    with pytest.raises(ValueError, match="^tool_choice "):
        plan_tools(tools, choice)
