"""HTTP plumbing for long-running requests: noticing a client that left, and closing streams for good."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run `work` until it ends or the client disconnects (then cancel it): (finished, result)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        undone = [t for t in (watcher, task) if not t.done()]
        for pending in undone:
            pending.cancel()  # cancelling the work aborts its engine requests
        if undone:
            # cancel() only asks: a task is cancelled once it has run its handlers, so wait for that
            # (asyncio.wait raises nothing of the tasks' own).
            await asyncio.wait(undone)
    if task.cancelled():
        return False, None
    return True, task.result()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` however the stream ends: done, disconnect or cancel."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # The body iterator may be left suspended at a yield; this frees its requests' blocks now.
            self.on_close()
