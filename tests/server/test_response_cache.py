"""The response cache: identical deterministic requests are answered without the engine, whole or streamed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from serve_harness import FakeEngine, ThreadedServer, scrape

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

QUERIES = "kvserve:response_cache_queries_total"
HITS = "kvserve:response_cache_hits_total"
CAPACITY = 2


@dataclass
class Cached:
    engine: FakeEngine
    url: str  # response_cache_size=CAPACITY
    off_url: str  # the default: no cache

    def post(self, body: dict, url: str | None = None) -> dict:
        response = httpx.post(f"{url or self.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def stream(self, body: dict) -> list[dict]:
        with httpx.stream("POST", f"{self.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(event) for event in events[:-1]]

    def counters(self) -> tuple[float, float]:
        samples = scrape(self.url)
        return samples[QUERIES], samples[HITS]

    @property
    def num_engine_requests(self) -> int:
        return len(self.engine.prompts)


@pytest.fixture(scope="module")
def cached() -> Iterator[Cached]:
    engine = FakeEngine(step_s=0.005)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    on = build_app(async_engine, metrics, ServerConfig(served_model_name="fake", response_cache_size=CAPACITY))
    off = build_app(async_engine, ServerMetrics(), ServerConfig(served_model_name="fake"))
    with ThreadedServer(on) as on_server, ThreadedServer(off) as off_server:
        yield Cached(engine, on_server.url, off_server.url)
    async_engine.shutdown()


def greedy(prompt: list[int], **fields: Any) -> dict:
    return {"model": "fake", "prompt": prompt, "max_tokens": 4, "temperature": 0, **fields}


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created", "usage")}


def test_hit_replays_the_same_body_under_a_new_id(cached: Cached) -> None:
    queries, hits = cached.counters()
    before = cached.num_engine_requests
    first = cached.post(greedy([1, 1]))
    # `user` does not change the answer: still the same request (`stream_options` needs a stream: below).
    second = cached.post(greedy([1, 1], user="someone else"))
    assert cached.num_engine_requests == before + 1
    assert without_ids(second) == without_ids(first) and second["id"] != first["id"]
    assert first["usage"]["response_cache_hit"] is False and second["usage"]["response_cache_hit"] is True
    assert {**second["usage"], "response_cache_hit": False} == first["usage"]
    assert cached.counters() == (queries + 2, hits + 1)


def test_hit_replays_as_a_stream_and_a_stream_fills_the_cache(cached: Cached) -> None:
    whole = cached.post(greedy([2, 2]))
    before = cached.num_engine_requests
    chunks = cached.stream(greedy([2, 2], stream_options={"include_usage": True}))
    assert cached.num_engine_requests == before
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"]["response_cache_hit"] is True
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    # The other way round: a streamed answer is stored once it has finished.
    streamed = cached.stream(greedy([3, 3]))
    hit = cached.post(greedy([3, 3]))
    assert cached.num_engine_requests == before + 1 and hit["usage"]["response_cache_hit"] is True
    assert hit["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in streamed)


def test_sampled_without_seed_is_never_cached_but_with_a_seed_it_is(cached: Cached) -> None:
    queries, hits = cached.counters()
    before = cached.num_engine_requests
    sampled = {"model": "fake", "prompt": [4, 4], "max_tokens": 2}  # temperature 1 by default
    for _ in range(2):
        assert cached.post(sampled)["usage"]["response_cache_hit"] is False
    assert cached.num_engine_requests == before + 2
    assert cached.counters() == (queries, hits)  # not even looked up
    seeded = {**sampled, "seed": 7}
    assert cached.post(seeded)["usage"]["response_cache_hit"] is False
    assert cached.post(seeded)["usage"]["response_cache_hit"] is True
    assert cached.post({**seeded, "seed": 8})["usage"]["response_cache_hit"] is False
    assert cached.num_engine_requests == before + 4


def test_least_recently_used_entry_goes_first(cached: Cached) -> None:
    a, b, c = greedy([5, 1]), greedy([5, 2]), greedy([5, 3])
    cached.post(a)
    cached.post(b)
    assert cached.post(a)["usage"]["response_cache_hit"] is True  # a is now the most recent
    cached.post(c)  # evicts b, not a
    assert cached.post(a)["usage"]["response_cache_hit"] is True
    assert cached.post(c)["usage"]["response_cache_hit"] is True
    before = cached.num_engine_requests
    assert cached.post(b)["usage"]["response_cache_hit"] is False
    assert cached.num_engine_requests == before + 1


def test_size_zero_disables_the_cache(cached: Cached) -> None:
    before = cached.num_engine_requests
    for _ in range(2):
        assert cached.post(greedy([6, 6]), cached.off_url)["usage"]["response_cache_hit"] is False
    assert cached.num_engine_requests == before + 2
    samples = scrape(cached.off_url)
    assert samples[QUERIES] == 0 and samples[HITS] == 0


def test_failed_and_aborted_requests_are_not_stored(cached: Cached) -> None:
    cached.engine.num_to_fail = 1
    assert httpx.post(f"{cached.url}/v1/completions", json=greedy([7, 7]), timeout=30).status_code == 500
    assert cached.post(greedy([7, 7]))["usage"]["response_cache_hit"] is False  # computed again
    assert cached.post(greedy([7, 7]))["usage"]["response_cache_hit"] is True
    # A stream whose client leaves after the first chunk is aborted: nothing stored.
    body = greedy([8, 8], max_tokens=60, stream=True)
    with httpx.stream("POST", f"{cached.url}/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 30
    while cached.engine.requests:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cached.post(greedy([8, 8], max_tokens=60))["usage"]["response_cache_hit"] is False


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="response_cache_size"):
        ServerConfig(response_cache_size=-1)
