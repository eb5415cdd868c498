"""The response cache: whole answers to deterministic requests, kept in a bounded LRU and replayed.

A request is deterministic when it is greedy (temperature 0) or sampled with a fixed `seed`; the same request
then yields the same tokens, so its final engine outputs can answer the next identical one without a step. The
key is the endpoint plus the canonical JSON of the parsed request, less the fields that only change how the
answer travels (`stream`, `stream_options`) or who asked (`user`); `model` is left out too, since a request
that reaches the cache named the one served model. A hit replays the outputs as a whole response or as a
stream (one delta per choice), under a new id, with `usage.response_cache_hit` set. Errored or aborted
requests are never stored. This sits above the prefix cache, which reuses a prompt's KV blocks, not answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel

from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.metrics import ServerMetrics
from kvserve.server.serving import OutputStream

# Fields that do not change the tokens generated: how the answer travels, who asked, and which model
# (already checked to be the served one).
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "model"})
_UNFINISHED_REASONS = (None, "abort", "error")


def is_deterministic(params: SamplingParams) -> bool:
    """Whether the same request always yields the same tokens: greedy, or sampled from a fixed seed."""
    return params.is_greedy or params.seed is not None


def _is_clean(output: RequestOutput) -> bool:
    """Finished by a stop or the length limit: neither aborted nor failed."""
    return output.finished and output.error is None and all(
        c.finish_reason not in _UNFINISHED_REASONS for c in output.outputs)


def _replayed(output: RequestOutput, request_id: str) -> RequestOutput:
    """A cached final output under a new request id, its whole text as the delta (one chunk per choice)."""
    completions = [dataclasses.replace(c, delta_text=c.text, delta_token_ids=list(c.token_ids))
                   for c in output.outputs]
    return dataclasses.replace(output, request_id=request_id, outputs=completions)


class ReplayStream:
    """Cached final outputs as an OutputStream: each request's one and only output, already finished."""

    def __init__(self, outputs: list[RequestOutput], request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._outputs = [_replayed(o, rid) for o, rid in zip(outputs, request_ids, strict=True)]

    def abort(self) -> None:
        """Nothing runs in the engine."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        for output in self._outputs:
            yield output


class RecordingStream:
    """Passes an engine stream through and hands its final outputs to `store` if every request ended cleanly."""

    def __init__(self, stream: OutputStream, store: Callable[[list[RequestOutput]], None]) -> None:
        self.request_ids = stream.request_ids
        self._stream = stream
        self._store = store

    def abort(self) -> None:
        """Abort the engine requests (an aborted stream is never stored)."""
        self._stream.abort()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        async for output in self._stream:
            if output.finished:
                final[output.request_id] = output
            yield output
        # Reached only when the reader took every output: a client that left stops before this line.
        outputs = [final.get(request_id) for request_id in self.request_ids]
        if all(o is not None and _is_clean(o) for o in outputs):
            self._store(outputs)


class ResponseCache:
    """A bounded LRU from request key to final outputs; `capacity` 0 disables it."""

    def __init__(self, capacity: int, metrics: ServerMetrics) -> None:
        self.capacity = capacity
        self._metrics = metrics
        self._entries: OrderedDict[str, list[RequestOutput]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, endpoint: str, body: BaseModel, params: SamplingParams) -> str | None:
        """The request's key, or None when it may not be cached (cache off, or sampled without a seed)."""
        if self.capacity == 0 or not is_deterministic(params):
            return None
        fields = body.model_dump(mode="json", exclude=set(IGNORED_FIELDS))
        canonical = json.dumps([endpoint, fields], sort_keys=True, separators=(",", ":"))
        # A digest, so that an entry costs its outputs, not a second copy of a long prompt.
        return hashlib.sha256(canonical.encode()).hexdigest()

    def lookup(self, key: str | None, request_ids: list[str]) -> ReplayStream | None:
        """The cached answer as a stream under these request ids, or None; counts queries and hits."""
        if key is None:
            return None
        self._metrics.response_cache_queries.inc()
        outputs = self._entries.get(key)
        if outputs is None:
            return None
        self._entries.move_to_end(key)
        self._metrics.response_cache_hits.inc()
        return ReplayStream(outputs, request_ids)

    def recording(self, key: str | None, stream: OutputStream) -> OutputStream:
        """`stream`, stored under `key` once it has finished cleanly (as it is when the key is None)."""
        if key is None:
            return stream
        return RecordingStream(stream, lambda outputs: self._store(key, outputs))

    def _store(self, key: str, outputs: list[RequestOutput]) -> None:
        self._entries[key] = outputs
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
