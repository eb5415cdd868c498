"""The web page's server side: `/` and its static files, and the read-only KV endpoints it polls."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from serve_harness import API_KEY, MODEL

from kvserve.server.playground import STATIC_DIR

# A system prompt of several full blocks (16 tokens each), shared by the requests that reuse its cached prefix.
SYSTEM = "You are a helpful assistant who answers in short sentences. " * 8


def snapshot(url: str, **headers: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/kv/snapshot", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@contextmanager
def streaming_chat(url: str, system: str, content: str, max_tokens: int = 400) -> Iterator[None]:
    """A chat answer streaming in the background; inside the block it has produced its first chunk. On exit the
    stream is closed (the server aborts the request)."""
    started, stop = threading.Event(), threading.Event()

    def run() -> None:
        body = {"model": MODEL, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}]}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            for _ in response.iter_lines():
                started.set()
                if stop.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60), "no chunk within 60 s"
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def wait_for_free_blocks(url: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        picture = snapshot(url)
        if not any(picture["ref_counts"]) or time.monotonic() > deadline:
            return picture
        time.sleep(0.05)


def test_the_page_and_its_files_are_served_without_a_key(live) -> None:
    for url in (live.url, live.keyed_url):
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/static/app.js">' in page.text
    names = sorted(path.name for path in STATIC_DIR.iterdir())
    assert names == ["api.js", "app.js", "chat.js", "index.html", "kv.js", "markdown.js", "mic-worklet.js", "style.css",
                     "voice.js"]
    for name in names:
        response = httpx.get(f"{live.keyed_url}/static/{name}", timeout=10)
        assert response.status_code == 200
        expected = {"js": "javascript", "css": "text/css", "html": "text/html"}[name.rsplit(".", 1)[1]]
        assert expected in response.headers["content-type"]
        # Nothing from a CDN: no script, style or import from another origin.
        assert not re.search(r"""(src|href|from|import)\s*[=(]?\s*["']https?://""", response.text), name


def test_kv_endpoints_need_the_key_where_the_api_does(live) -> None:
    assert httpx.get(f"{live.keyed_url}/v1/kv/snapshot", timeout=10).status_code == 401
    assert httpx.get(f"{live.keyed_url}/v1/kv/memory", timeout=10).status_code == 401
    assert snapshot(live.keyed_url, Authorization=f"Bearer {API_KEY}")["num_blocks"] > 0


def test_snapshot_shows_a_request_s_blocks_while_it_runs_and_none_after(live) -> None:
    wait_for_free_blocks(live.url)
    with streaming_chat(live.url, "Be brief.", "Count from one to a hundred."):
        picture = snapshot(live.url)
        running = [r for r in picture["requests"] if r["status"] == "running"]
        assert len(running) == 1
        table = running[0]["block_table"]
        assert table and all(picture["ref_counts"][block] >= 1 for block in table)
        assert sum(count > 0 for count in picture["ref_counts"]) == len(table)
        assert picture["stats"]["num_running"] == 1 and picture["latency"]["ttft_count"] >= 1
    picture = wait_for_free_blocks(live.url)
    assert not any(picture["ref_counts"]) and not picture["requests"]
    assert picture["cached_blocks"]  # the finished request's full blocks stay cached for reuse


def test_two_requests_sharing_a_system_prompt_share_its_blocks(live) -> None:
    wait_for_free_blocks(live.url)
    with streaming_chat(live.url, SYSTEM, "Tell me a story."), streaming_chat(live.url, SYSTEM, "Name a color."):
        picture = snapshot(live.url)
    tables = [r["block_table"] for r in picture["requests"] if r["status"] == "running"]
    assert len(tables) == 2
    shared = [block for block, count in enumerate(picture["ref_counts"]) if count == 2]
    # The system prompt's full blocks: the same blocks lead both tables.
    lead = tables[0][:len(shared)]
    assert len(shared) >= 4 and lead == tables[1][:len(shared)] and sorted(lead) == shared
    second = max(picture["requests"], key=lambda r: r["num_cached_tokens"])
    assert second["num_cached_tokens"] >= 16 * len(shared)
    assert not any(wait_for_free_blocks(live.url)["ref_counts"])


def test_kv_memory_describes_the_loaded_model(live) -> None:
    response = httpx.get(f"{live.url}/v1/kv/memory", params={"context": 1000}, timeout=10)
    assert response.status_code == 200
    report = response.json()
    real = [row for row in report["attention"] if row["is_real"]]
    assert len(real) == 1 and real[0]["attention"] == "GQA" and real[0]["num_kv_heads"] == 3
    # SmolLM2: 30 layers x 3 KV heads x (64 + 64) dims x 4 bytes (float32).
    assert real[0]["bytes_per_token"]["float32"] == 30 * 3 * 128 * 4
    assert report["context"] == 1000 and report["model_dtype"] == "float32"
    bad = httpx.get(f"{live.url}/v1/kv/memory", params={"context": 0}, timeout=10)
    assert bad.status_code == 400 and "context" in bad.text


def test_snapshot_without_an_engine_loop_is_a_503() -> None:
    from fastapi.testclient import TestClient
    from serve_harness import FakeEngine

    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.server.api_server import build_app
    from kvserve.server.config import ServerConfig
    from kvserve.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    engine = AsyncEngine(FakeEngine(), metrics)  # its loop never started
    response = TestClient(build_app(engine, metrics, ServerConfig(served_model_name="fake"))).get("/v1/kv/snapshot")
    assert response.status_code == 503
    assert response.json()["error"]["message"].startswith("no KV snapshot: the engine loop is not running")
