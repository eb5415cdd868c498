"""Graceful shutdown: on SIGTERM stop admitting, let requests in flight finish for a while, then abort the rest.

uvicorn alone closes its listening socket at once and then waits without bound for the responses in flight
(a chat without max_tokens may run to the context length), or cancels them without a last chunk. Here the
socket stays open while draining, so that load balancers read `/health` 503 `{"status": "draining"}` and new
requests get 503 + Retry-After; after `drain_timeout_s` every unfinished engine stream fails with a 503 error:
a whole response becomes that error, a stream ends with an error event and `[DONE]`. Then uvicorn shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from kvserve.engine.async_engine import RequestStream
from kvserve.server.errors import OpenAIError

logger = logging.getLogger(__name__)

# After the drain timeout's aborts: time for the handlers to send their last chunks before uvicorn closes.
_FLUSH_S = 5.0


def shutting_down(retry_after_s: int) -> OpenAIError:
    """The 503 of a request refused, or cut short, because the server is shutting down."""
    return OpenAIError(503, "the server is shutting down; retry on another instance or later",
                       type="server_error", code="shutting_down", headers={"Retry-After": str(retry_after_s)})


class Drain:
    """The drain state of one app: whether it drains, and the engine streams its responses still read."""

    def __init__(self, timeout_s: float, retry_after_s: int) -> None:
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.is_draining = False  # set once, from a signal handler: new work is refused from then on
        self.streams: set[RequestStream] = set()

    def check_open(self) -> None:
        """503 while draining."""
        if self.is_draining:
            raise shutting_down(self.retry_after_s)

    def track(self, stream: RequestStream) -> None:
        """Count a response in flight until its stream has been read to the end or aborted."""
        self.streams = {s for s in self.streams if not s.finished}
        self.streams.add(stream)

    def in_flight(self) -> set[RequestStream]:
        """The tracked streams not yet read to the end (nor aborted)."""
        self.streams = {s for s in self.streams if not s.finished}
        return self.streams

    async def run(self) -> None:
        """Wait for the responses in flight up to the timeout, then fail the rest and let them flush."""
        self.is_draining = True
        if not await self._wait_until_idle(self.timeout_s):
            logger.warning("drain timeout (%.1f s): aborting %d response(s) in flight", self.timeout_s,
                           len(self.in_flight()))
            error = shutting_down(self.retry_after_s)
            for stream in list(self.in_flight()):
                stream.fail(error)
            await self._wait_until_idle(_FLUSH_S)

    async def _wait_until_idle(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight()


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM or SIGINT drains (see `Drain`) before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: start draining (on the next tick); a second one: uvicorn's own exit."""
        if self.drain.is_draining or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it after shutdown, to exit with it
        self.drain.is_draining = True  # only a flag: a signal handler must not touch the event loop

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's 0.1 s tick: start the drain once asked, and exit once it is over."""
        if self.drain.is_draining and self._drain_task is None:
            logger.info("draining: up to %.1f s for %d response(s) in flight", self.drain.timeout_s,
                        len(self.drain.in_flight()))
            self._drain_task = asyncio.ensure_future(self.drain.run())
        if self._drain_task is not None and self._drain_task.done():
            self.should_exit = True
        return await super().on_tick(counter)
