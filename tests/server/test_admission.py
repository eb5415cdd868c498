"""--max-waiting-requests bounds the queue in sequences, atomically with enqueueing, and never while slots are free."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from serve_harness import FakeEngine, ThreadedServer, assert_openai_error

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

BODY = {"model": "fake", "prompt": [1, 2, 3], "max_tokens": 3}


@contextmanager
def fake_server(engine: FakeEngine, max_waiting_requests: int) -> Iterator[str]:
    """A real HTTP server over `engine`; yields its URL."""
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    config = ServerConfig(served_model_name="fake", max_waiting_requests=max_waiting_requests)
    try:
        with ThreadedServer(build_app(async_engine, metrics, config)) as server:
            yield server.url
    finally:
        async_engine.shutdown()


def test_simultaneous_requests_overfill_no_queue() -> None:
    # Paused, the engine schedules nothing: 2 slots + 4 waiting places admit exactly 6 of 40 requests.
    engine = FakeEngine(step_s=0.01, max_num_seqs=2)
    engine.is_paused = True

    async def main(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            tasks = [asyncio.ensure_future(client.post(f"{url}/v1/completions", json=BODY)) for _ in range(40)]
            while sum(task.done() for task in tasks) < 34:  # the refused ones come back at once
                await asyncio.sleep(0.01)
            engine.is_paused = False  # now the admitted ones can finish
            return list(await asyncio.gather(*tasks))

    with fake_server(engine, max_waiting_requests=4) as url:
        responses = asyncio.run(main(url))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 6 and statuses.count(503) == 34, statuses
    for response in responses:
        if response.status_code == 503:
            assert assert_openai_error(response, 503)["code"] == "overloaded"
            assert response.headers["Retry-After"] == "1"
    assert engine.peak_num_waiting <= 4


def test_one_request_larger_than_the_bound_is_400() -> None:
    with fake_server(FakeEngine(), max_waiting_requests=4) as url:
        body = {**BODY, "prompt": [[1, 2]] * 64, "n": 16, "max_tokens": 1}  # 1,024 sequences
        error = assert_openai_error(httpx.post(f"{url}/v1/completions", json=body, timeout=60), 400, "n")
        assert "1024 sequences" in error["message"] and "68" in error["message"]
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "n": 16}
        # n=16 alone fits (16 <= 64 + 4); the chat then fails for want of a template, which is a 400 too.
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 400


def test_free_slots_are_never_shed() -> None:
    # No waiting place at all, but 64 free slots: 40 requests, one every 20 ms, are all served.
    engine = FakeEngine(step_s=0.01)

    async def main(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = []
            for _ in range(40):
                tasks.append(asyncio.ensure_future(client.post(f"{url}/v1/completions", json=BODY)))
                await asyncio.sleep(0.02)
            return [r.status_code for r in await asyncio.gather(*tasks)]

    with fake_server(engine, max_waiting_requests=0) as url:
        assert asyncio.run(main(url)) == [200] * 40
        # A group of 64 prompts takes 64 slots: still no wait, so it is served too.
        body = {**BODY, "prompt": [[1, 2]] * 64, "max_tokens": 1}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
