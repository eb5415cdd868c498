"""Continuous batching: each step, pick requests and how many new tokens each computes (pure Python).

One step model for everything: a request has `num_computed_tokens` in the KV cache and `num_tokens`
known tokens; a step gives it `num_new_tokens` of the difference under the token budget. A new
prompt, a prompt chunk, a decode and a recompute after preemption are all the same thing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvserve.config import SchedulerConfig
from kvserve.engine.request import Request, RequestStatus
from kvserve.kv.kv_manager import KVCacheManager


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_computed_tokens: int  # tokens already in the KV cache before this step
    num_new_tokens: int  # tokens whose K/V this step computes
    block_table: list[int]
    is_sampling: bool  # the step reaches the end of the known tokens, so a new token is sampled


@dataclass
class SchedulerOutput:
    """What the runner computes this step: the only thing that crosses from scheduler to runner."""

    scheduled: list[ScheduledRequest]
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # since the last step

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed this step across all requests."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to run."""
        return not self.scheduled


@dataclass
class SampledTokens:
    """What the runner hands back: the new token of each sampling request, by request id."""

    token_ids: dict[str, int]
    logprobs: dict[str, dict[int, float] | None] = field(default_factory=dict)


class Scheduler:
    """Running requests first (oldest first), then waiting ones; preempts the newest when blocks run out."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < config.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens "
                             f"({config.max_num_batched_tokens}) must be >= max_model_len "
                             f"({config.max_model_len})")
        self.config = config
        self.kv_manager = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_since_last_step: list[str] = []

    @property
    def num_unfinished(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        """Queue a new request."""
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's requests and token counts, allocating their KV blocks."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                index += 1
                continue
            self.kv_manager.evict_outside_window(request.request_id, request.num_computed_tokens)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # the request preempted itself: nobody later in the list can run either
            scheduled.append(self._schedule(request, num_new))
            budget -= num_new
            index += 1
        # New work only when nobody had to be preempted: admitting it would just thrash.
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            # A new or preempted request starts from whatever prefix of it is cached.
            prefix = self.kv_manager.find_cached_prefix(request.all_token_ids)
            num_cached = len(prefix.blocks) * self.kv_manager.block_size
            num_new = self._num_new_tokens(request, budget, num_cached)
            if num_new == 0:
                break
            if not self.kv_manager.allocate_slots(request.request_id, num_cached + num_new, prefix):
                break
            request.num_computed_tokens = num_cached
            self.kv_manager.evict_outside_window(request.request_id, num_cached)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._schedule(request, num_new))
            budget -= num_new
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        return SchedulerOutput(scheduled, preempted, finished)

    def _num_new_tokens(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        computed = request.num_computed_tokens if num_computed is None else num_computed
        remaining = request.num_tokens - computed
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0
        return min(remaining, budget)

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate blocks for `request`, preempting the newest running requests until they fit."""
        needed = request.num_computed_tokens + num_new
        while not self.kv_manager.allocate_slots(request.request_id, needed):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule(self, request: Request, num_new: int) -> ScheduledRequest:
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        computed = request.num_computed_tokens
        return ScheduledRequest(request, computed, num_new,
                                self.kv_manager.block_table(request.request_id),
                                is_sampling=computed + num_new == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first in line; it will recompute its tokens."""
        self.kv_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, sampled: SampledTokens) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests; returns those with a new token."""
        updated: list[Request] = []
        now = time.monotonic()
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue  # aborted while the step ran
            request.num_computed_tokens += item.num_new_tokens
            self.kv_manager.cache_full_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)
            token = sampled.token_ids.get(request.request_id)
            if token is None:
                continue  # a prompt chunk: no token yet
            request.append_token(token)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            stop = request.check_stop()
            if stop is not None:
                self.finish_request(request.request_id, stop)
            updated.append(request)
        return updated

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (stopped, length, aborted or failed) and free its blocks; None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        request.finished_time = time.monotonic()
        self.kv_manager.free(request_id)
        self._finished_since_last_step.append(request_id)
        return request
