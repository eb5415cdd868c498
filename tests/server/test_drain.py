"""SIGTERM drain: new work gets 503 and /health says draining; work in flight finishes, or ends with a last chunk."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from serve_harness import FakeEngine, ThreadedServer, assert_openai_error

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.drain import DrainingServer
from kvserve.server.metrics import ServerMetrics

DRAIN_S = 2.0


def _eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _events(body: str) -> list[Any]:
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]


def test_sigterm_drains_then_aborts_with_a_final_chunk() -> None:
    engine = FakeEngine(step_s=0.02)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    app = build_app(async_engine, metrics, ServerConfig(served_model_name="fake", drain_timeout_s=DRAIN_S))
    server = ThreadedServer(app, lambda config: DrainingServer(config, app.state.server.drain))
    results: dict[str, httpx.Response] = {}

    def call(name: str, max_tokens: int, stream: bool) -> None:
        body = {"prompt": [1, 2], "max_tokens": max_tokens, "stream": stream}
        results[name] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)

    clients = [threading.Thread(target=call, args=args) for args in
               (("long_stream", 10_000, True), ("long_whole", 10_000, False), ("short_stream", 30, True))]
    try:
        server.__enter__()
        for client in clients:
            client.start()
        _eventually(lambda: len(engine.requests) == 3)
        started = time.monotonic()
        server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls

        health = httpx.get(f"{server.url}/health", timeout=10)
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1], "max_tokens": 2}, timeout=10)
        assert assert_openai_error(refused, 503)["code"] == "shutting_down" and refused.headers["Retry-After"]

        for client in clients:
            client.join(60)
        server.thread.join(60)
        assert not server.thread.is_alive()
        # Generous bound: the drain timeout, the flush and uvicorn's own shutdown; not a performance claim.
        assert time.monotonic() - started < DRAIN_S + 10
    finally:
        server.server.should_exit = True
        server.thread.join(10)
        async_engine.shutdown()

    short = _events(results["short_stream"].text)  # finished inside the drain window: a normal end
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
    long = _events(results["long_stream"].text)  # cut at the timeout: an error event, then [DONE]
    assert long[-1] == "[DONE]" and json.loads(long[-2])["error"]["code"] == "shutting_down"
    assert assert_openai_error(results["long_whole"], 503)["code"] == "shutting_down"
    assert not engine.requests  # both long requests were aborted in the engine


def test_head_health_is_200() -> None:
    engine = FakeEngine()
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    try:
        with ThreadedServer(build_app(async_engine, metrics, ServerConfig())) as server:
            response = httpx.head(f"{server.url}/health", timeout=10)
            assert response.status_code == 200 and response.content == b""
    finally:
        async_engine.shutdown()
