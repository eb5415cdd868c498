"""Prompts to token ids, the way the offline LLM facade makes them."""

from __future__ import annotations

from typing import Any


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A conversation rendered with the model's chat template, ready for the reply (as LLM.chat does)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages cannot be rendered: this model has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # templates reject conversations they cannot render (raise_exception)
        raise ValueError(f"messages cannot be rendered with the model's chat template: {error}") from error
    # The template already wrote the special tokens it wants; a BOS added here would be a second one.
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """A completion prompt as token ids: text is encoded as Engine.tokenize does, ids pass through."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) if prompt else []
    return list(prompt)
