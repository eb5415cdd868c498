"""Fixtures of the speculative-decoding tests: the bundled prompts and reference, and tiny random Llamas."""

from __future__ import annotations

from typing import Any

import pytest
from spec_cases import COPY_TEXT, TINY, generate_ids, save_tiny_model

from kvserve import LLM


@pytest.fixture(scope="module")
def bundled_prompts() -> list[Any]:
    """A copy task (the drafts mostly hit), two open prompts (they mostly miss) and a repeated one that shares a
    cached prefix with the copy task."""
    copy = f"Copy this code exactly:\n{COPY_TEXT}\nCopy:\n"
    return [copy, "The capital of France is", "Once upon a time, in a small village by the sea,",
            copy + "def total"]


@pytest.fixture(scope="module")
def bundled_reference(bundled_prompts) -> list[list[int]]:
    """The bundled model's greedy tokens without drafts, on its defaults."""
    return generate_ids(LLM(show_progress=False), bundled_prompts)



@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer.save_pretrained(path)
    return save_tiny_model(path, *TINY["gqa"][:1], len(tokenizer), **TINY["gqa"][1])


@pytest.fixture(scope="module")
def small_vocab_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> str:
    """A tiny Llama over 16 tokens: its samples repeat the prompt's n-grams often enough to accept drafts."""
    path = tmp_path_factory.mktemp("small-vocab-llama")
    tokenizer.save_pretrained(path)
    return save_tiny_model(path, *TINY["gqa"][:1], 16, **TINY["gqa"][1])
