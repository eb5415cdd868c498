"""The tiny models the distributed tests share (tiny_models.py), saved once per session."""

from __future__ import annotations

import pytest
from tiny_models import CASES, save_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, str]:
    """Every case saved once; the vocabulary is one longer than the tokenizer's, so it splits unevenly."""
    paths = {}
    for name in CASES:
        path = tmp_path_factory.mktemp(name)
        save_model(name, path, len(tokenizer) + 1, tokenizer)
        paths[name] = str(path)
    return paths


