"""WebSocket streaming with a real client (the `websockets` library): same request in, same chunks out."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_harness import API_KEY, GREEDY_MAX_TOKENS, GREEDY_PROMPTS, MODEL, FakeEngine, ThreadedServer, scrape
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

BODY = {"model": "fake", "prompt": [1, 2, 3], "max_tokens": 5}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ABORTS = 'kvserve:request_success_total{finished_reason="abort"}'


class StubTokenizer:
    """Just enough of a tokenizer for the fake engine's chat requests."""

    chat_template = "stub"

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
        return "|".join(message["content"] for message in messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 1000 for c in text]


class Servers:
    """A fake engine behind an open server and a keyed one."""

    def __init__(self, engine: FakeEngine, url: str, keyed_url: str) -> None:
        self.engine, self.url, self.keyed_url = engine, url, keyed_url

    def ws(self, path: str, url: str | None = None, **kwargs: Any) -> ClientConnection:
        return connect((url or self.url).replace("http://", "ws://") + path, open_timeout=30, **kwargs)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    engine = FakeEngine(step_s=0.01)
    engine.input_processor.tokenizer = StubTokenizer()
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    apps = [build_app(async_engine, metrics, ServerConfig(served_model_name="fake")),
            build_app(async_engine, metrics, ServerConfig(served_model_name="fake", api_key=API_KEY))]
    with ThreadedServer(apps[0]) as open_server, ThreadedServer(apps[1]) as keyed_server:
        yield Servers(engine, open_server.url, keyed_server.url)
    async_engine.shutdown()


def answer(ws: ClientConnection, request: dict | str) -> list[dict]:
    """Send a request and read its frames up to (not including) the done frame."""
    ws.send(request if isinstance(request, str) else json.dumps(request))
    return read_answer(ws)


def read_answer(ws: ClientConnection) -> list[dict]:
    frames = []
    while (frame := json.loads(ws.recv(timeout=30))) != {"type": "done"}:
        frames.append(frame)
    return frames


def sse_chunks(url: str, path: str, body: dict, **kwargs: Any) -> list[dict]:
    """The JSON events of an SSE stream, [DONE] excluded."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60, **kwargs) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def without_ids(chunks: list[dict]) -> list[dict]:
    return [{k: v for k, v in chunk.items() if k not in ("id", "created")} for chunk in chunks]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", BODY),
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}),
])
def test_socket_sends_the_sse_chunks(servers: Servers, path: str, body: dict) -> None:
    with servers.ws(path + "/ws") as ws:
        frames = answer(ws, body)
    assert len({frame["id"] for frame in frames}) == 1
    assert without_ids(frames) == without_ids(sse_chunks(servers.url, path, body))


def test_several_requests_on_one_socket_are_answered_in_order(servers: Servers) -> None:
    with servers.ws("/v1/completions/ws") as ws:
        # Sent back to back: the second waits for the first.
        ws.send(json.dumps({**BODY, "max_tokens": 3}))
        ws.send(json.dumps({**BODY, "max_tokens": 2, "stream_options": {"include_usage": True}}))
        first, second = read_answer(ws), read_answer(ws)
    assert "".join(c["choices"][0]["text"] for c in first if c["choices"]) == "abc"
    assert "".join(c["choices"][0]["text"] for c in second if c["choices"]) == "ab"
    assert second[-1]["usage"]["completion_tokens"] == 2 and "usage" not in first[-1]


def _http_error(url: str, path: str, body: Any) -> dict:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    return {"error": response.json()["error"], "status_code": response.status_code}


@pytest.mark.parametrize(("path", "request_"), [
    ("/v1/completions", "{not json"),
    ("/v1/completions", "[1, 2]"),
    ("/v1/completions", {**BODY, "n": "2"}),
    ("/v1/completions", {**BODY, "temperature": -1}),
    ("/v1/completions", {**BODY, "model": "other"}),
    ("/v1/completions", {**BODY, "prompt": []}),
    ("/v1/chat/completions", {**CHAT, "messages": []}),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}),
])
def test_errors_are_frames_like_http_and_the_socket_stays_usable(servers: Servers, path: str,
                                                                 request_: Any) -> None:
    with servers.ws(path + "/ws") as ws:
        (frame,) = answer(ws, request_)
        expected = _http_error(servers.url, path, request_)
        assert frame["status_code"] == expected["status_code"] and frame["status_code"] in (400, 404)
        # The same fields and codes; pydantic may word a message differently from FastAPI.
        assert {**frame["error"], "message": None} == {**expected["error"], "message": None}
        assert frame["error"]["message"].split(":")[0] == expected["error"]["message"].split(":")[0]
        good = answer(ws, BODY if path == "/v1/completions" else CHAT)
    assert good[-1]["choices"][0]["finish_reason"] == "length"


def test_engine_failure_midway_is_an_error_frame(servers: Servers) -> None:
    servers.engine.num_to_fail = 1
    with servers.ws("/v1/completions/ws") as ws:
        frames = answer(ws, BODY)
        assert frames[-1]["status_code"] == 500 and "injected" in frames[-1]["error"]["message"]
        assert answer(ws, BODY)[-1]["choices"][0]["finish_reason"] == "length"


def _wait(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_closing_the_socket_aborts_the_request_and_frees_its_blocks(servers: Servers) -> None:
    engine = servers.engine
    aborts = scrape(servers.url).get(ABORTS, 0)
    with servers.ws("/v1/completions/ws") as ws:
        ws.send(json.dumps({**BODY, "max_tokens": 10_000}))
        while not json.loads(ws.recv(timeout=30))["choices"]:
            pass  # a first token: the request is running
        assert len(engine.requests) == 1
        request_id = next(iter(engine.requests))
    _wait(lambda: not engine.requests)
    assert engine.aborted[-1] == request_id
    _wait(lambda: scrape(servers.url)["kvserve:kv_cache_usage_ratio"] == 0)
    assert scrape(servers.url)[ABORTS] == aborts + 1


def test_closing_with_requests_queued_runs_none_of_them(servers: Servers) -> None:
    engine = servers.engine
    before = len(engine.prompts)
    with servers.ws("/v1/completions/ws") as ws:
        for _ in range(3):
            ws.send(json.dumps({**BODY, "max_tokens": 10_000}))
        while not json.loads(ws.recv(timeout=30))["choices"]:
            pass
    _wait(lambda: not engine.requests)
    assert len(engine.prompts) == before + 1  # the queued two never reached the engine


def test_binary_frame_closes_with_1003(servers: Servers) -> None:
    with servers.ws("/v1/completions/ws") as ws:
        ws.send(json.dumps(BODY).encode())
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


def test_too_many_queued_requests_close_with_1008(servers: Servers) -> None:
    with servers.ws("/v1/completions/ws") as ws, pytest.raises(ConnectionClosed) as closed:
        # The server may close while the requests are still being sent: a send then raises the close.
        for _ in range(20):
            ws.send(json.dumps({**BODY, "max_tokens": 10_000}))
        while True:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    _wait(lambda: not servers.engine.requests)


@pytest.mark.parametrize("credentials", [{}, {"additional_headers": {"Authorization": "Bearer wrong"}},
                                         {"query": "?api_key=wrong"}, {"query": f"?api_key={API_KEY}&api_key=x"}])
def test_socket_without_the_key_is_refused_with_401(servers: Servers, credentials: dict) -> None:
    query = credentials.pop("query", "")
    with pytest.raises(InvalidStatus) as refused:
        servers.ws("/v1/completions/ws" + query, servers.keyed_url, **credentials)
    response = refused.value.response
    assert response.status_code == 401
    assert json.loads(response.body)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("credentials", [{"additional_headers": {"Authorization": f"Bearer {API_KEY}"}},
                                         {"query": f"?api_key={API_KEY}"}])
def test_socket_with_the_key_in_a_header_or_the_query(servers: Servers, credentials: dict) -> None:
    query = credentials.pop("query", "")
    with servers.ws("/v1/completions/ws" + query, servers.keyed_url, **credentials) as ws:
        assert answer(ws, BODY)[-1]["choices"][0]["finish_reason"] == "length"


def test_live_socket_text_equals_sse_and_offline_greedy(live) -> None:
    body = {"model": MODEL, "prompt": GREEDY_PROMPTS[0], "max_tokens": GREEDY_MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    with connect(live.url.replace("http://", "ws://") + "/v1/completions/ws", open_timeout=30) as ws:
        frames = answer(ws, body)
    sse = sse_chunks(live.url, "/v1/completions", body)
    ws_text = "".join(chunk["choices"][0]["text"] for chunk in frames)
    assert ws_text == "".join(chunk["choices"][0]["text"] for chunk in sse) == live.expected[GREEDY_PROMPTS[0]].text
    assert without_ids(frames) == without_ids(sse)
