"""Size limits: a body over --max-request-body-bytes is a 413; text too long to fit is refused before tokenizing."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from serve_harness import FakeEngine, ThreadedServer, assert_openai_error

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.limits import max_chars_per_token
from kvserve.server.metrics import ServerMetrics

LIMIT = 2000
BODY = {"model": "fake", "prompt": [1, 2, 3], "max_tokens": 2}


@pytest.fixture(scope="module")
def small_body_server() -> Iterator[str]:
    metrics = ServerMetrics()
    async_engine = AsyncEngine(FakeEngine(), metrics)  # type: ignore[arg-type]
    async_engine.start()
    config = ServerConfig(served_model_name="fake", max_request_body_bytes=LIMIT)
    with ThreadedServer(build_app(async_engine, metrics, config)) as server:
        yield server.url
    async_engine.shutdown()


def test_default_body_limit_is_4_mib() -> None:
    assert ServerConfig().max_request_body_bytes == 4 * 2**20
    with pytest.raises(ValueError, match="max_request_body_bytes"):
        ServerConfig(max_request_body_bytes=0)


def test_declared_large_body_is_413(small_body_server) -> None:
    big = {**BODY, "prompt": [1] * LIMIT}
    error = assert_openai_error(httpx.post(f"{small_body_server}/v1/completions", json=big, timeout=60), 413)
    assert str(LIMIT) in error["message"] and error["code"] == "request_too_large"


def test_streamed_large_body_is_413_and_the_server_goes_on(small_body_server) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"prompt": ['
        for _ in range(LIMIT // 5):  # 9 bytes each: about 2 x LIMIT
            yield b"1, 1, 1, "
        yield b"1]}"

    response = httpx.post(f"{small_body_server}/v1/completions", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert str(LIMIT) in assert_openai_error(response, 413)["message"]
    assert httpx.post(f"{small_body_server}/v1/completions", json=BODY, timeout=60).status_code == 200


def test_chars_per_token_bound(live) -> None:
    assert max_chars_per_token(live.tokenizer) == max(map(len, live.tokenizer.get_vocab()))
    # A normalizer may drop characters: no bound then.
    normalizing = SimpleNamespace(backend_tokenizer=SimpleNamespace(normalizer=object(), pre_tokenizer=None))
    assert max_chars_per_token(normalizing) is None
    assert max_chars_per_token(object()) is None


@pytest.mark.parametrize(("path", "field"), [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_text_too_long_for_the_context_is_refused_by_its_length(live, path: str, field: str) -> None:
    max_model_len = httpx.get(f"{live.url}/v1/models").json()["data"][0]["max_model_len"]
    text = "a" * (max_model_len * max_chars_per_token(live.tokenizer) + 1)  # under the 4 MiB body limit
    body = {"prompt": text} if field == "prompt" else {"messages": [{"role": "user", "content": text}]}
    error = assert_openai_error(httpx.post(f"{live.url}{path}", json=body, timeout=60), 400, field)
    # "characters", not "tokens": the answer came from the length alone, without tokenizing.
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
