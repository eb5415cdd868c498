"""Tools in the prompt: the chat template's own rendering when it reads `tools`, else a Hermes-style fallback.

The fallback (Qwen2.5 / Hermes 2 Pro style, what vLLM's `hermes` parser reads) puts the tools' signatures in the
system message and asks for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; assistant tool calls in
the history become that same text, and tool results become `<tool_response>` blocks in a user turn, so that any
template (even one that only knows user / assistant / system) renders the whole conversation.
"""

from __future__ import annotations

import json
from typing import Any

from kvserve.tools.parser import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

Message = dict[str, Any]

_INSTRUCTIONS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{signatures}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_supports_tools(template: str | dict[str, str] | None) -> bool:
    """Whether a chat template reads the `tools` variable (then it renders calls and results itself too)."""
    if isinstance(template, dict):  # named templates: transformers picks "tool_use" when tools are given
        return "tool_use" in template or any(template_supports_tools(t) for t in template.values())
    if not template:
        return False
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:  # a template transformers' own environment accepts but plain Jinja does not
        return "tools" in template


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The fallback's system block: each tool's definition as one JSON line, and the call format."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return _INSTRUCTIONS.format(signatures=signatures)


def has_tool_messages(messages: list[Message]) -> bool:
    """Whether the history holds assistant tool calls or tool results."""
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def render_tool_call(call: dict[str, Any]) -> str:
    """One call as the fallback asks the model to write it."""
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def fallback_messages(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """Messages for a template without tools: the tool block in the system message, calls and results as text."""
    names = {call["id"]: call["function"]["name"] for m in messages for call in m.get("tool_calls") or []}
    rendered: list[Message] = []
    for message in messages:
        if message.get("role") == "tool":
            response = _tool_response(message, names)
            previous = rendered[-1] if rendered else None
            if previous is not None and previous.get("is_tool_results"):
                previous["content"] += "\n" + response  # consecutive results: one turn, as Qwen's template does
            else:
                rendered.append({"role": "user", "content": response, "is_tool_results": True})
        elif message.get("tool_calls"):
            parts = [message["content"]] if message.get("content") else []
            parts += [render_tool_call(call) for call in message["tool_calls"]]
            rendered.append({"role": message["role"], "content": "\n".join(parts)})
        else:
            rendered.append(message)
    for message in rendered:
        message.pop("is_tool_results", None)
    if tools:
        rendered = _with_tools_block(rendered, tools_system_prompt(tools))
    return rendered


def _tool_response(message: Message, names: dict[str, str]) -> str:
    name = names.get(message.get("tool_call_id", ""), message.get("name"))
    body = message.get("content", "") if name is None else json.dumps(
        {"name": name, "content": message.get("content", "")}, ensure_ascii=False)
    return f"<tool_response>\n{body}\n</tool_response>"


def _with_tools_block(messages: list[Message], block: str) -> list[Message]:
    """The block at the end of the first system message, or a system message of its own."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{block}" if first.get("content") else block
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]
