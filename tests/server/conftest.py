"""One bundled-model engine for the whole server suite, behind three real uvicorn servers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from openai import OpenAI
from serve_harness import API_KEY, CHAT_MESSAGES, GREEDY_MAX_TOKENS, GREEDY_PROMPTS, MODEL, ThreadedServer

from kvserve import LLM, SamplingParams
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics


@dataclass
class Live:
    """The servers under test and what the offline LLM said before they started."""

    url: str  # no API key
    keyed_url: str  # requires API_KEY
    full_url: str  # max_waiting_requests=0: only free slots are served; a request that would wait is a 503
    llm: LLM
    expected: dict[str, Any]  # prompt -> LLM.generate's greedy CompletionOutput (EOS ignored)
    expected_chat: Any  # LLM.chat's greedy CompletionOutput for CHAT_MESSAGES

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def client(self, **kwargs: Any) -> OpenAI:
        """The official client against the open server; no retries, so errors show as they are."""
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def live() -> Iterator[Live]:
    llm = LLM(kv_cache_memory=64 * 2**20, show_progress=False)
    # The offline answers first: once the async loop owns the engine, nothing else may step it.
    greedy = SamplingParams(temperature=0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(GREEDY_PROMPTS, greedy, use_tqdm=False)
    chat = llm.chat(CHAT_MESSAGES, SamplingParams(temperature=0, max_tokens=GREEDY_MAX_TOKENS), use_tqdm=False)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(llm.engine, metrics)
    async_engine.start()
    configs = [ServerConfig(served_model_name=MODEL),
               ServerConfig(served_model_name=MODEL, api_key=API_KEY),
               ServerConfig(served_model_name=MODEL, max_waiting_requests=0)]
    servers = [ThreadedServer(build_app(async_engine, metrics, config)) for config in configs]
    try:
        for server in servers:
            server.__enter__()
        yield Live(servers[0].url, servers[1].url, servers[2].url, llm,
                   {p: o.outputs[0] for p, o in zip(GREEDY_PROMPTS, outputs, strict=True)},
                   chat[0].outputs[0])
    finally:
        for server in servers:
            if server.thread.is_alive():
                server.__exit__()
        async_engine.shutdown()
