"""One bundled-model LLM for the structured-output tests (building it costs about 10 s)."""

from __future__ import annotations

import pytest

from kvserve import LLM


@pytest.fixture(scope="session")
def llm() -> LLM:
    return LLM(kv_cache_memory=64 * 2**20, show_progress=False)
