"""Tools in the prompt: a template that reads `tools` renders them itself; any other gets the fallback."""

from __future__ import annotations

import json

from tool_harness import CHATML_TEMPLATE, TOOLS_TEMPLATE, byte_tokenizer

from kvserve.inputs import InputProcessor
from kvserve.server.protocol import ChatMessage
from kvserve.tools.prompt import fallback_messages, template_supports_tools, tools_system_prompt

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def rendered(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt text InputProcessor gives a conversation, as the server passes it (ChatMessage.for_template)."""
    tokenizer = byte_tokenizer(template)
    processor = InputProcessor(tokenizer, vocab_size=1000, max_model_len=8192)
    for_template = [ChatMessage.model_validate(m).for_template() for m in messages]
    return tokenizer.decode(processor.apply_chat_template(for_template, tools))


def test_support_is_read_from_the_template_variables() -> None:
    assert template_supports_tools(TOOLS_TEMPLATE)
    assert not template_supports_tools(CHATML_TEMPLATE)
    assert not template_supports_tools("{# no tools here #}{{ 'tools' }}{% for m in messages %}{% endfor %}")
    assert template_supports_tools({"default": CHATML_TEMPLATE, "tool_use": TOOLS_TEMPLATE})
    assert not template_supports_tools(None)


def test_plain_conversations_render_as_before() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert fallback_messages(messages, None) == messages
    expected = byte_tokenizer(CHATML_TEMPLATE).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered(CHATML_TEMPLATE, messages) == expected


def test_fallback_adds_the_tools_to_the_system_message() -> None:
    text = rendered(CHATML_TEMPLATE, [{"role": "system", "content": "Be brief."}, HISTORY[0]], [TOOL])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(TOOL)}\n</tools>" in text
    assert tools_system_prompt([TOOL]) in text and text.count("<|im_start|>system") == 1


def test_fallback_writes_calls_and_results_as_text() -> None:
    text = rendered(CHATML_TEMPLATE, HISTORY)  # history alone, no tools offered: still in the prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"name": "get_weather", "content": "sunny"}\n'
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in text
    assert "# Tools" not in text


def test_template_with_tools_renders_them_itself() -> None:
    text = rendered(TOOLS_TEMPLATE, HISTORY, [TOOL])
    assert text == ('[TOOLS]get_weather:{"type": "object", "properties": {"city": {"type": "string"}}};[/TOOLS]\n'
                    "[user]Weather in Paris?\n"
                    '[assistant]CALL get_weather({"city": "Paris"})\n'  # arguments reach the template parsed
                    "[tool]sunny #call_1\n"
                    "[assistant]")
    assert "<tool_call>" not in text and "# Tools" not in text
