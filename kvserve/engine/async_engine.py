"""AsyncEngine: one background thread drives the Engine; asyncio callers get per-request output streams.

The server builds the Engine on that thread too (`AsyncEngine.launch`). libgomp keeps one team of worker threads
per thread that runs parallel regions, and once more of its threads exist than cores it stops spinning between
regions and puts the workers to sleep instead: a model loaded (warmed up) on the main thread and stepped on
another made every decode step's ~200 parallel regions pay a sleep and a wake-up, which doubled the step on
2 cores. Loading and stepping on one thread keeps a single team.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine, EngineStats
from kvserve.inputs import PromptInput
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Receives engine events on the engine thread (metrics); must be quick and never raise."""

    def on_output(self, output: RequestOutput, now: float) -> None:
        """A request produced tokens or finished; `now` is time.monotonic() when the step ended."""

    def on_abort(self, request_id: str) -> None:
        """A request was aborted (its client left) before it finished."""

    def on_error(self, request_id: str) -> None:
        """A request failed outside a step's own error handling and was ended."""

    def on_stats(self, stats: EngineStats) -> None:
        """Engine-wide numbers after a step or after commands were applied."""


class EngineDeadError(RuntimeError):
    """The engine loop is not running, so no request can be served."""


class OverloadedError(RuntimeError):
    """Too many sequences wait for a slot: the request was not enqueued (the server answers 503)."""


@dataclass
class GenerateRequest:
    """One engine request: its id, prompt and sampling parameters."""

    request_id: str
    prompt: PromptInput
    params: SamplingParams


@dataclass
class _Add:
    requests: list[GenerateRequest]
    stream: RequestStream
    accepted: asyncio.Future
    arrival_time: float


@dataclass
class _Abort:
    request_ids: list[str]


class _Stop:
    pass


@dataclass
class _Call:
    function: Callable[[Engine], Any]
    result: concurrent.futures.Future


class RequestStream:
    """Outputs of one or more engine requests, handed from the engine thread to the caller's event loop."""

    def __init__(self, request_ids: list[str], loop: asyncio.AbstractEventLoop, engine: AsyncEngine) -> None:
        self.request_ids = request_ids
        self._loop = loop
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        """Whether every request of the stream has delivered its final output."""
        return not self._unfinished

    def deliver(self, item: RequestOutput | BaseException) -> bool:
        """Queue an output or error from any thread; False if the caller's loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop was closed: nobody will read this stream again
            return False
        return True

    def abort(self) -> None:
        """Stop the stream's unfinished requests and free their KV blocks; safe to call twice."""
        if self._unfinished:
            self._engine.abort(sorted(self._unfinished))
            self._unfinished.clear()

    def fail(self, error: BaseException) -> None:
        """Abort the unfinished requests and end the stream with `error`, which its reader raises (drain timeout)."""
        if self._unfinished:
            self._engine.abort(sorted(self._unfinished))
            # Unlike abort(), the requests stay unfinished: the reader goes on to the error and raises it.
            self.deliver(error)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while self._unfinished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self._unfinished.discard(item.request_id)
                yield item
        finally:
            # Leaving early (client gone, cancellation, error) must give the blocks back.
            self.abort()


class AsyncEngine:
    """Owns an Engine on one thread so that concurrent requests share its steps (continuous batching)."""

    def __init__(self, engine: Engine, observer: EngineObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # owned by the engine thread
        self._lock = threading.Lock()
        self._num_pending = 0  # requests handed to the thread but not yet added to the engine
        self._num_waiting = 0  # the scheduler's waiting queue after the last step, plus adds since
        self._num_running = 0  # the scheduler's running sequences after the last step
        self.max_num_seqs: int = engine.config.scheduler.max_num_seqs
        self._thread: threading.Thread | None = None
        self._closed = False  # set by the engine thread as it exits; no command is accepted after

    # ---- lifecycle ------------------------------------------------------------------------

    @classmethod
    def launch(cls, config: EngineConfig, observer: EngineObserver | None = None) -> AsyncEngine:
        """Build the Engine on a new engine thread and start stepping it there; raises what loading raised."""
        built: concurrent.futures.Future[AsyncEngine] = concurrent.futures.Future()

        def build_and_run() -> None:
            try:
                async_engine = cls(Engine(config), observer)
            except BaseException as error:
                built.set_exception(error)
                return
            async_engine._thread = threading.current_thread()
            built.set_result(async_engine)
            async_engine._run()

        threading.Thread(target=build_and_run, name="kvserve-engine", daemon=True).start()
        return built.result()

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step; unfinished streams get EngineDeadError."""
        if self._thread is not None:
            self._commands.put(_Stop())
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        """Whether the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet scheduled: the admission queue's length."""
        with self._lock:
            return self._num_waiting + self._num_pending

    # ---- caller side (any event loop) -----------------------------------------------------

    def check_admission(self, num_seqs: int, max_waiting: int) -> None:
        """Raise unless `num_seqs` more sequences leave at most `max_waiting` waiting once free slots fill.

        A sequence that can be scheduled at once is not waiting: the rule is
        waiting + pending + new <= max_waiting + free slots (max_num_seqs - running). ValueError (a 400) when
        the request could never fit, OverloadedError (a 503) when it does not fit now.
        """
        with self._lock:
            self._check_room(num_seqs, max_waiting)

    def _check_room(self, num_seqs: int, max_waiting: int) -> None:
        # Caller holds self._lock.
        if num_seqs > max_waiting + self.max_num_seqs:
            raise ValueError(f"n times the number of prompts is {num_seqs} sequences; this server takes at most "
                             f"{max_waiting + self.max_num_seqs} at once (max_num_seqs {self.max_num_seqs} + "
                             f"max_waiting_requests {max_waiting})")
        free_slots = max(0, self.max_num_seqs - self._num_running)
        if self._num_waiting + self._num_pending + num_seqs > max_waiting + free_slots:
            raise OverloadedError(f"{self._num_waiting + self._num_pending} sequences are waiting")

    async def generate(self, requests: Sequence[GenerateRequest], max_waiting: int | None = None) -> RequestStream:
        """Add requests as one group; raises ValueError (naming the field) if the engine rejects any.

        With `max_waiting`, the group is admitted only if the queue has room (see `check_admission`), checked
        under the same lock that counts it as pending, so that concurrent callers cannot overfill the queue.
        """
        loop = asyncio.get_running_loop()
        stream = RequestStream([r.request_id for r in requests], loop, self)
        accepted = loop.create_future()
        num_seqs = sum(r.params.n for r in requests)
        with self._lock:
            # Under the lock: a command queued before the thread closes is always answered by it.
            if self._closed or not self.is_running:
                raise EngineDeadError("the engine loop is not running")
            if max_waiting is not None:
                self._check_room(num_seqs, max_waiting)
            self._num_pending += num_seqs
            self._commands.put(_Add(list(requests), stream, accepted, time.monotonic()))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    def call(self, function: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run `function(engine)` on the engine thread between steps (what touches the KV cache's blocks and
        tensors must); callable from any thread. Its future fails with EngineDeadError once the loop is gone."""
        command = _Call(function, concurrent.futures.Future())
        with self._lock:
            if self._closed or not self.is_running:
                command.result.set_exception(EngineDeadError("the engine loop is not running"))
                return command.result
            self._commands.put(command)
        return command.result

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests before the next engine step; callable from any thread."""
        self._commands.put(_Abort(request_ids))

    # ---- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    # Block only when idle: with work to do, commands are applied between steps.
                    if self._apply_commands(block=not self.engine.has_unfinished_requests()):
                        return
                    if self.engine.has_unfinished_requests():
                        self._step()
                    self._publish_stats()
                except Exception as error:  # a bug here fails the requests in flight, never the loop
                    logger.exception("engine loop iteration failed")
                    self._fail_all(error)
        finally:
            self._close()

    def _close(self) -> None:
        """Fail what is in flight or still queued, so that no caller waits forever."""
        with self._lock:
            self._closed = True
        dead = EngineDeadError("the engine was shut down")
        self._fail_all(dead)
        while True:
            try:
                command = self._commands.get(block=False)
            except queue.Empty:
                return
            if isinstance(command, _Add):
                with self._lock:
                    self._num_pending -= sum(r.params.n for r in command.requests)
                self._resolve(command, dead)
            elif isinstance(command, _Call) and command.result.set_running_or_notify_cancel():
                command.result.set_exception(dead)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; True if asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return False
            block = False
            if isinstance(command, _Stop):
                return True
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Call):
                self._call(command)
            else:
                self._abort(command.request_ids)

    def _call(self, command: _Call) -> None:
        if not command.result.set_running_or_notify_cancel():
            return
        try:
            command.result.set_result(command.function(self.engine))
        except Exception as error:  # the caller's to handle
            command.result.set_exception(error)

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        error: Exception | None = None
        try:
            for request in command.requests:
                self.engine.add_request(request.request_id, request.prompt, request.params, command.arrival_time)
                added.append(request.request_id)
        except Exception as rejected:  # all or nothing: a group with one bad prompt adds none
            error = rejected
            for request_id in added:
                self.engine.abort_request(request_id)
        else:
            for request_id in added:
                self._streams[request_id] = command.stream
        # Waiting in the engine from here on: move the count from pending to waiting in one step, so that the
        # sequences are never missing from the admission count before the next stats refresh.
        num_seqs = sum(r.params.n for r in command.requests)
        with self._lock:
            self._num_pending -= num_seqs
            if error is None:
                self._num_waiting += num_seqs
        self._resolve(command, error)

    def _resolve(self, command: _Add, error: Exception | None) -> None:
        """Tell the waiting caller whether its requests were accepted."""
        future = command.accepted

        def settle() -> None:
            if future.done():  # the caller was cancelled meanwhile; its stream aborts itself
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        try:
            future.get_loop().call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed
            self._abort([r.request_id for r in command.requests])

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._streams.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)
                if self.observer is not None:
                    self.observer.on_abort(request_id)

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        for output in outputs:
            if self.observer is not None:
                self.observer.on_output(output, now)
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            if not stream.deliver(output) and not output.finished:
                self._abort([output.request_id])

    def _fail_all(self, error: Exception) -> None:
        """End every request in flight with `error`, freeing their blocks."""
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.deliver(error)
            if self.observer is not None:
                self.observer.on_error(request_id)
        self._streams.clear()

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self._num_waiting = stats.num_waiting
            self._num_running = stats.num_running
        if self.observer is not None:
            self.observer.on_stats(stats)
