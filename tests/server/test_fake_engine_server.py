"""The HTTP layer over a model-free fake engine: overload with a real queue, internal errors, metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from serve_harness import FakeEngine, ThreadedServer, assert_openai_error, scrape

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

BODY = {"model": "fake", "prompt": [1, 2, 3], "max_tokens": 5}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine(step_s=0.02)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    app = build_app(async_engine, metrics, ServerConfig(served_model_name="fake", max_waiting_requests=4))
    with ThreadedServer(app) as server:
        yield engine, server.url
    async_engine.shutdown()


def test_full_waiting_queue_is_503_while_running_requests_finish(fake_server) -> None:
    engine, url = fake_server
    result: dict[str, str] = {}

    def long_stream() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "max_tokens": 40, "stream": True},
                          timeout=60) as response:
            result["body"] = response.read().decode()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        engine.num_waiting = 100  # the scheduler reports a full queue (past the free slots) from the next step on
        for _ in range(200):
            response = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
            if response.status_code == 503:
                break
        error = assert_openai_error(response, 503)
        assert error["type"] == "server_error" and response.headers["Retry-After"] == "1"
    finally:
        engine.num_waiting = 0
    thread.join(60)
    assert result["body"].endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in result["body"]
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).status_code == 200  # admitted again


def test_engine_error_fails_that_request_alone(fake_server) -> None:
    engine, url = fake_server
    before = scrape(url).get("kvserve:request_failure_total", 0)
    engine.num_to_fail = 1
    response = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error" and "injected" in error["message"]
    engine.num_to_fail = 1
    body = httpx.post(f"{url}/v1/completions", json={**BODY, "stream": True}, timeout=60).text
    assert '"error"' in body and body.endswith("data: [DONE]\n\n")  # headers were sent: an error event
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).status_code == 200
    assert scrape(url)["kvserve:request_failure_total"] == before + 2


def test_metrics_exposes_every_series(fake_server) -> None:
    _, url = fake_server
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).status_code == 200
    text = httpx.get(f"{url}/metrics").text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio",
                 "prompt_tokens_total", "generation_tokens_total", 'request_success_total{finished_reason="length"}',
                 "request_failure_total", "preemptions_total"):
        assert f"kvserve:{name}" in text, name
    samples = scrape(url)
    assert samples["kvserve:time_to_first_token_seconds_count"] >= 1
    assert samples["kvserve:inter_token_latency_seconds_count"] >= 4  # 5 tokens: 4 gaps per request
