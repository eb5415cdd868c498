"""WebSocket streaming beside SSE: the HTTP request's JSON in, the SSE stream's chunk JSON out.

The protocol of `/v1/chat/completions/ws` and `/v1/completions/ws`:
- The client sends one request per text frame: the body it would POST to the HTTP endpoint. `stream` is implied
  (`stream_options.include_usage` is honoured). Requests on one socket are answered one after another, in order;
  at most MAX_QUEUED may wait behind the one in flight.
- Each answer is the chunk objects of the SSE stream, one per text frame, then `{"type": "done"}` (where SSE
  sends `data: [DONE]`). Every request gets exactly one done frame, so a client can pipeline requests.
- An error is a frame `{"error": {"message", "type", "param", "code"}, "status_code": N}`, with the status the
  same body would get over HTTP (400 for invalid JSON or fields, 404 for another model, 503 when overloaded, 500
  for a failure in the engine), followed by the done frame; the socket stays usable.
- Closing the socket aborts the request in flight and frees its KV blocks within a step.
- A binary frame closes the socket with 1003 (unsupported data); more than MAX_QUEUED waiting requests with
  1008 (policy violation); a bug in the server with 1011.
- With an API key, the upgrade needs `Authorization: Bearer KEY` or, for browsers that cannot set headers,
  `?api_key=KEY`; otherwise it is refused with 401 (server/auth.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from kvserve.server.errors import OpenAIError, internal_error, validation_error

logger = logging.getLogger(__name__)

DONE = json.dumps({"type": "done"})
MAX_QUEUED = 8  # requests a client may send ahead of the one being answered
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011


@dataclass(frozen=True)
class SocketEndpoint:
    """An HTTP endpoint served over a socket too: its request model and its job builder (api_server.py)."""

    request_model: type[BaseModel]
    build_job: Callable[[Any, Any], Awaitable[Any]]  # (server, parsed body) -> Job


def socket_router(endpoints: dict[str, SocketEndpoint]) -> APIRouter:
    """A router with `<path>/ws` for each HTTP path."""
    router = APIRouter()
    for path, endpoint in endpoints.items():
        router.add_api_websocket_route(path + "/ws", _route(endpoint))
    return router


def _route(endpoint: SocketEndpoint) -> Callable[[WebSocket], Awaitable[None]]:
    async def stream_over_socket(websocket: WebSocket) -> None:
        await serve_socket(websocket, endpoint)

    return stream_over_socket


async def serve_socket(websocket: WebSocket, endpoint: SocketEndpoint) -> None:
    """Answer the socket's requests in order until the client leaves or breaks the protocol."""
    await websocket.accept()
    inbox: asyncio.Queue[str] = asyncio.Queue()
    reader = asyncio.create_task(_read_frames(websocket, inbox))
    try:
        while True:
            message = asyncio.ensure_future(inbox.get())
            if not await _unless_reader_ends(message, reader):
                break
            answer = asyncio.ensure_future(_answer(websocket, endpoint, message.result()))
            if not await _unless_reader_ends(answer, reader):
                break  # the client left mid-answer: cancelling the answer aborted its requests
            if answer.exception() is not None:
                raise answer.exception()
    except WebSocketDisconnect:
        return  # a send found the client gone
    except Exception:
        logger.exception("websocket %s failed", websocket.url.path)
        await _close(websocket, INTERNAL_ERROR)
        return
    finally:
        reader.cancel()
    code = None if reader.cancelled() else reader.result()
    if code is not None:
        await _close(websocket, code)


async def _unless_reader_ends(work: asyncio.Future, reader: asyncio.Task) -> bool:
    """Wait for `work`; if the reader ends first (client gone, protocol broken), cancel it and say False."""
    await asyncio.wait({work, reader}, return_when=asyncio.FIRST_COMPLETED)
    if not reader.done():
        return True
    if not work.done():
        work.cancel()
        await asyncio.wait({work})
    return False


async def _read_frames(websocket: WebSocket, inbox: asyncio.Queue[str]) -> int | None:
    """Queue the client's text frames until it leaves (None) or breaks the protocol (the close code)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        if text is None:
            return UNSUPPORTED_DATA
        if inbox.qsize() >= MAX_QUEUED:
            return POLICY_VIOLATION
        inbox.put_nowait(text)


async def _close(websocket: WebSocket, code: int) -> None:
    try:
        await websocket.close(code)
    except (RuntimeError, WebSocketDisconnect):  # already closed by the client
        pass


def _parse(request_model: type[BaseModel], text: str) -> BaseModel:
    """The request in a frame, validated as the HTTP endpoint validates its body (same errors)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise validation_error([{"type": "json_invalid", "loc": (error.pos,), "msg": "JSON decode error"}]) \
            from None
    if isinstance(data, dict):
        data = {**data, "stream": True}  # implied, so that stream_options is valid here
    try:
        return request_model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error.errors()) from None


async def _send_error(websocket: WebSocket, error: OpenAIError) -> None:
    await websocket.send_text(json.dumps({"error": error.info.model_dump(), "status_code": error.status_code}))


async def _answer(websocket: WebSocket, endpoint: SocketEndpoint, text: str) -> None:
    """One request's frames: its chunks or an error, then the done frame."""
    server = websocket.app.state.server
    try:
        job = await endpoint.build_job(server, _parse(endpoint.request_model, text))
        outputs = await server.open(job)
    except OpenAIError as error:
        await _send_error(websocket, error)
        await websocket.send_text(DONE)
        return
    except Exception as error:  # as over HTTP: a bug fails this request with a 500, not the socket
        logger.error("websocket request on %s failed", websocket.url.path, exc_info=error)
        await _send_error(websocket, internal_error(f"internal error: {type(error).__name__}"))
        await websocket.send_text(DONE)
        return
    formatter = job.formatter
    chunks = formatter.chunks(outputs, job.num_choices)
    try:
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except Exception as error:  # the engine failed midway: an error frame, as an SSE error event
                await _send_error(websocket, formatter.stream_error(error))
                break
            await websocket.send_text(formatter.chunk_json(chunk))
    finally:
        await chunks.aclose()
        outputs.abort()  # a no-op once finished; frees the blocks of a request whose client left
    await websocket.send_text(DONE)
