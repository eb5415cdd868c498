"""A non-streaming client that leaves: its work is cancelled, the 499 branch is reached and nothing is logged."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from serve_harness import FakeEngine, ThreadedServer

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics
from kvserve.server.streaming import unless_disconnected


class _LeavingClient:
    """Stands in for a Request whose client disconnects at once."""

    async def receive(self) -> dict[str, str]:
        return {"type": "http.disconnect"}


def test_disconnect_cancels_the_work_and_reports_not_finished() -> None:
    cancelled = []

    async def work() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "done"

    finished, result = asyncio.run(unless_disconnected(_LeavingClient(), work()))  # type: ignore[arg-type]
    assert (finished, result) == (False, None) and cancelled == [True]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def warnings_logged() -> Iterator[list[logging.LogRecord]]:
    # uvicorn's loggers do not propagate to the root, so listen on them directly.
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("kvserve", "uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def _eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_real_disconnect_aborts_without_an_error_logged(warnings_logged) -> None:
    engine = FakeEngine(step_s=0.01)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)  # type: ignore[arg-type]
    async_engine.start()
    app = build_app(async_engine, metrics, ServerConfig(served_model_name="fake"))
    try:
        with ThreadedServer(app) as server:
            for attempt in range(4):
                host, port = server.url.removeprefix("http://").split(":")
                data = json.dumps({"prompt": [1, 2], "max_tokens": 10_000}).encode()
                with socket.create_connection((host, int(port))) as sock:
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
                    _eventually(lambda: bool(engine.requests))
                # The socket is closed: the request is aborted within a step or two.
                _eventually(lambda: len(engine.aborted) == attempt + 1 and not engine.requests)  # noqa: B023
            time.sleep(0.2)  # let the handlers finish after the abort, where the error used to be raised
    finally:
        async_engine.shutdown()
    assert [record.getMessage() for record in warnings_logged] == []
