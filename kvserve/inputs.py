"""The one input processor: prompts to token ids, chat templates, and the length rules (LLM, CLI and server).

Length rules (as vLLM): a prompt must leave room for at least one generated token, and prompt + max_tokens must
fit in max_model_len; otherwise the request is rejected with a ValueError naming the field and the limit.
max_tokens=None means "up to the end of the context window".
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

from kvserve.sampling_params import SamplingParams
from kvserve.tools.prompt import fallback_messages, has_tool_messages, template_supports_tools

# A prompt: text, token ids, {"prompt_token_ids": [...]} (with an optional "prompt" text) or {"prompt": text}.
PromptInput = str | list[int] | dict
Messages = list[dict[str, Any]]


class ContextLengthExceededError(ValueError):
    """The prompt, or the prompt plus max_tokens, does not fit in the context window."""


@dataclass
class ProcessedPrompt:
    """A validated prompt: its text where there was one, its token ids and its resolved max_tokens."""

    prompt: str | None
    prompt_token_ids: list[int]
    max_tokens: int


class InputProcessor:
    """Tokenizes and checks prompts against the model's vocabulary and context window."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """A prompt as (text or None, token ids); token ids pass through as they are."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        return None, list(prompt)

    def apply_chat_template(self, messages: Messages, tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation (and the tools it may call) rendered with the model's chat template,
        ready for the reply unless `add_generation_prompt` is false."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("messages cannot be rendered: this model has no chat template; give it one "
                             "(--chat-template, a Jinja file) or use a plain prompt (/v1/completions, LLM.generate)")
        extra: dict[str, Any] = {}
        if template_supports_tools(template):
            extra = {"tools": tools} if tools else {}
        elif tools or has_tool_messages(messages):
            messages = fallback_messages(messages, tools)  # the template cannot show tools, calls or results
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **extra)
        except Exception as error:  # templates reject conversations they cannot render (raise_exception)
            raise ValueError(f"messages cannot be rendered with the model's chat template: {error}") from error
        # The template already wrote the special tokens it wants; a BOS added here would be a second one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def process(self, prompt: PromptInput, params: SamplingParams) -> ProcessedPrompt:
        """Tokenize and validate a prompt with its sampling params; raises ValueError naming the field."""
        text, token_ids = self.tokenize(prompt)
        self.check_prompt_token_ids(token_ids)
        params.verify(self.vocab_size)
        return ProcessedPrompt(text, token_ids, self.max_tokens(len(token_ids), params))

    def check_prompt_token_ids(self, token_ids: list[int]) -> None:
        """Non-empty, inside the vocabulary, and leaving room for one generated token."""
        if not token_ids:
            raise ValueError("prompt must not be empty")
        limit = self.max_model_len
        if len(token_ids) >= limit:
            raise ContextLengthExceededError(f"prompt has {len(token_ids)} tokens; max_model_len is {limit} "
                                             "(prompt plus at least one generated token)")
        vocab = self.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}), got {bad[0]}")

    def max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The tokens a request may generate: max_tokens, or the rest of the context window when it is None."""
        room = self.max_model_len - num_prompt_tokens
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthExceededError(
                f"max_tokens is {params.max_tokens}, but the prompt's {num_prompt_tokens} tokens leave room "
                f"for {room} in the context window (max_model_len {self.max_model_len})")
        return params.max_tokens


def read_chat_template(value: str) -> str:
    """The template the `chat_template` option names: a file's text, or the value itself when it reads as Jinja."""
    path = pathlib.Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template")
