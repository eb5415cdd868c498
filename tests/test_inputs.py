"""kvserve/inputs.py: the one input processor that LLM, the CLI and the server share."""

from __future__ import annotations

from typing import Any

import pytest

from kvserve.inputs import ContextLengthExceededError, InputProcessor
from kvserve.sampling_params import SamplingParams

MAX_MODEL_LEN = 32


@pytest.fixture(scope="module")
def processor(tokenizer: Any) -> InputProcessor:
    return InputProcessor(tokenizer, vocab_size=49152, max_model_len=MAX_MODEL_LEN)


def test_prompt_forms(processor: InputProcessor, tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello there")
    assert processor.tokenize("Hello there") == ("Hello there", ids)
    assert processor.tokenize(ids) == (None, ids)
    assert processor.tokenize({"prompt_token_ids": ids}) == (None, ids)
    assert processor.tokenize({"prompt_token_ids": ids, "prompt": "Hello there"}) == ("Hello there", ids)
    assert processor.tokenize({"prompt": "Hello there"}) == ("Hello there", ids)


@pytest.mark.parametrize(("prompt", "message"), [
    ("", r"^prompt must not be empty"),
    ({"prompt_token_ids": []}, r"^prompt must not be empty"),
    ([1, 49152], r"^prompt_token_ids must be in \[0, 49152\), got 49152"),
    ([1, -1], r"^prompt_token_ids must be in \[0, 49152\), got -1"),
])
def test_bad_prompts_are_rejected_naming_the_field(processor: InputProcessor, prompt: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        processor.process(prompt, SamplingParams())


def test_context_length_rules(processor: InputProcessor) -> None:
    with pytest.raises(ContextLengthExceededError, match=rf"^prompt has 32 tokens; max_model_len is {MAX_MODEL_LEN}"):
        processor.process([1] * MAX_MODEL_LEN, SamplingParams())
    # prompt + max_tokens past the window is rejected, never silently capped.
    with pytest.raises(ContextLengthExceededError,
                       match=r"^max_tokens is 23, but the prompt's 10 tokens leave room for 22 .*max_model_len 32"):
        processor.process([1] * 10, SamplingParams(max_tokens=23))
    assert processor.process([1] * 10, SamplingParams(max_tokens=22)).max_tokens == 22
    assert processor.process([1] * 10, SamplingParams(max_tokens=None)).max_tokens == 22  # up to the context
    assert processor.process([1] * 31, SamplingParams(max_tokens=None)).max_tokens == 1


def test_stop_token_ids_are_checked_against_the_vocabulary(processor: InputProcessor) -> None:
    with pytest.raises(ValueError, match=r"^stop_token_ids must be in \[0, 49152\), got 49152"):
        processor.process([1], SamplingParams(stop_token_ids=[49152]))


def test_chat_template(processor: InputProcessor, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    ids = processor.apply_chat_template(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids).endswith("assistant\n")


def test_a_model_without_a_chat_template_is_a_clear_error() -> None:
    class Plain:
        chat_template = None

    with pytest.raises(ValueError, match=r"^messages cannot be rendered: this model has no chat template"):
        InputProcessor(Plain(), 10, 10).apply_chat_template([{"role": "user", "content": "Hi"}])
