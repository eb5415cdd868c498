"""Small HTTP details: trailing slashes are served (never a 307), and an unhandled error logs its traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from serve_harness import FakeEngine, ThreadedServer, assert_openai_error

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

KEY = "k-0123456789"


@pytest.fixture(scope="module")
def keyed_fake_server() -> Iterator[str]:
    metrics = ServerMetrics()
    async_engine = AsyncEngine(FakeEngine(), metrics)  # type: ignore[arg-type]
    async_engine.start()
    with ThreadedServer(build_app(async_engine, metrics, ServerConfig(served_model_name="fake", api_key=KEY))) as s:
        yield s.url
    async_engine.shutdown()


def test_trailing_slash_is_the_same_route(keyed_fake_server) -> None:
    url, auth = keyed_fake_server, {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=30, follow_redirects=False) as client:
        response = client.post("/v1/completions/", headers=auth, json={"prompt": [1, 2], "max_tokens": 2})
        assert response.status_code == 200 and response.json()["object"] == "text_completion"
        assert client.get("/v1/models/", headers=auth).json()["data"][0]["id"] == "fake"
        assert client.get("/health/").status_code == 200
        assert_openai_error(client.get("/v1/models/"), 401)  # the key is still required
        assert_openai_error(client.get("/v1/nothing/", headers=auth), 404)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(logging.Formatter().format(record))


def test_unhandled_error_logs_its_traceback(keyed_fake_server) -> None:
    handler = _Records()
    logger = logging.getLogger("kvserve.server.errors")
    logger.addHandler(handler)
    try:
        # The fake engine has no tokenizer: a text prompt fails inside the server, the one way to get a 500 here.
        response = httpx.post(f"{keyed_fake_server}/v1/completions", json={"prompt": "hi"}, timeout=30,
                              headers={"Authorization": f"Bearer {KEY}"})
    finally:
        logger.removeHandler(handler)
    assert_openai_error(response, 500)
    [text] = handler.texts
    assert "NoneType: None" not in text and "Traceback" in text and "AttributeError" in text
