"""`tool_choice`: which tools the prompt offers, how decoding is constrained, and how the reply is read.

As in vLLM: `auto` offers the tools and parses calls out of free text; `required` constrains the reply to a
JSON array of `{"name": <a tool>, "parameters": <its schema>}` (at least one); a named function constrains the
reply to that function's `parameters` schema and the server wraps it as a call; `none` neither offers the
tools nor parses calls (vLLM's `--exclude-tools-when-tool-choice-none`: a model shown tools it may not call
would write calls as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kvserve.tools.parser import NamedCallParser, ToolCallParser

ToolMode = Literal["none", "auto", "required", "named"]
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools (`tools` as OpenAI sends them: {"type": "function", "function"})."""

    tools: tuple[dict[str, Any], ...] = ()
    mode: ToolMode = "none"
    function_name: str | None = None  # the named function
    parallel_tool_calls: bool = True

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt offers, or None."""
        return list(self.tools) if self.mode != "none" and self.tools else None

    @property
    def names(self) -> list[str]:
        """The declared function names."""
        return [tool["function"]["name"] for tool in self.tools]

    def parameters(self, name: str) -> dict[str, Any]:
        """A function's parameters schema (no parameters: an empty object)."""
        function = next(tool["function"] for tool in self.tools if tool["function"]["name"] == name)
        return function.get("parameters") or _EMPTY_PARAMETERS

    def constraint(self) -> dict[str, Any] | None:
        """The JSON schema decoding must follow, or None when the reply is free text."""
        if self.mode == "named":
            return self.parameters(self.function_name)
        if self.mode != "required":
            return None
        calls = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [name]}, "parameters": self.parameters(name)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name in self.names]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel_tool_calls:
            schema["maxItems"] = 1
        return schema

    def parser(self) -> ToolCallParser | NamedCallParser | None:
        """A fresh reply parser for one choice, or None when calls are not parsed."""
        if self.mode == "named":
            return NamedCallParser(self.function_name)
        return None if self.mode == "none" else ToolCallParser(self.names)


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
               parallel_tool_calls: bool = True) -> ToolPlan:
    """The plan of a request's `tools` and `tool_choice`; a ValueError names `tool_choice` when they disagree."""
    tools = tuple(tools or ())
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in {tool["function"]["name"] for tool in tools}:
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
        return ToolPlan(tools, "named", name, parallel_tool_calls)
    if tool_choice == "required" and not tools:
        raise ValueError("tool_choice 'required' needs at least one function in tools")
    mode: ToolMode = "none" if not tools else tool_choice  # type: ignore[assignment]
    return ToolPlan(tools, mode, None, parallel_tool_calls)
