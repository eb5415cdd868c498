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
from kvserve.engine.sched_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    num_rejected_drafts,
)
from kvserve.engine.stop import StopCheck, check_stop
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.prefix_cache import CachedPrefix


@dataclass(slots=True)
class _RunnerView:
    """How much of a request the runner holds: the next diff starts there."""

    num_token_ids: int
    num_block_ids: int


@dataclass
class SpecDecodeStats:
    """Speculative decoding so far (vLLM's spec_decode_* counters): verify steps, drafts, accepted drafts."""

    num_drafts: int = 0  # requests' verify steps with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: verify steps that accepted draft i

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One request's verify step: `num_drafts` proposed, the first `num_accepted` of them accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        missing = num_drafts - len(self.accepted_per_position)
        self.accepted_per_position.extend([0] * max(missing, 0))
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    def snapshot(self) -> SpecDecodeStats:
        """A copy that later steps do not change."""
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_position))

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed ones (0 before any)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verify step yields on average: its accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class Scheduler:
    """Running requests first (oldest first), then waiting ones; preempts the newest when blocks run out."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager,
                 spec_max_batch: int | None = None, num_lookahead_tokens: int = 0,
                 quantizes_full_blocks: bool = False) -> None:
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < config.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens "
                             f"({config.max_num_batched_tokens}) must be >= max_model_len "
                             f"({config.max_model_len})")
        self.config = config
        self.kv_manager = kv_manager
        self.spec_max_batch = spec_max_batch  # no drafts verified while more requests than this run
        # Slots held past a sampling step's tokens, where a draft model writes its drafts' K/V.
        self.num_lookahead_tokens = num_lookahead_tokens
        # int4 caches quantize a block once it is full: drafts must not fill one (a rejected one would be in it).
        self.quantizes_full_blocks = quantizes_full_blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.spec_stats = SpecDecodeStats()
        self._finished_since_last_step: list[str] = []
        self._runner_views: dict[str, _RunnerView] = {}  # requests the runner holds

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
        output = SchedulerOutput()
        speculate = self._speculate()
        preempted = output.preempted_req_ids
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                index += 1
                continue
            drafts = self._drafts(request, num_new, budget, speculate)
            num_new += len(drafts)
            self.kv_manager.evict_outside_window(request.request_id, request.num_computed_tokens)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # the request preempted itself: nobody later in the list can run either
            self._schedule(request, num_new, output)
            if drafts:
                output.scheduled_spec_decode_tokens[request.request_id] = drafts
            budget -= num_new
            index += 1
        # New work only when nobody had to be preempted: admitting it would just thrash.
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            # A new or preempted request starts from whatever prefix of it is cached.
            prefix = self._cached_prefix(request)
            num_cached = prefix.num_blocks * self.kv_manager.block_size
            num_new = self._num_new_tokens(request, budget, num_cached)
            if num_new == 0:
                break
            end = num_cached + num_new
            if not self.kv_manager.allocate_slots(request.request_id, end + self._lookahead(request, end), prefix):
                break
            request.num_computed_tokens = num_cached
            self.kv_manager.evict_outside_window(request.request_id, num_cached)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._schedule(request, num_new, output)
            budget -= num_new
        output.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        output.propose_drafts = self._speculate()
        output.finished_req_ids, self._finished_since_last_step = self._finished_since_last_step, []
        return output

    def _speculate(self) -> bool:
        """Whether a step starting now verifies drafts (not while more requests run than spec_max_batch)."""
        return self.spec_max_batch is None or len(self.running) <= self.spec_max_batch

    def _lookahead(self, request: Request, end: int) -> int:
        """Slots past a step ending at token `end` when it reaches the request's last known token (it samples),
        within the context, while drafts are verified: the draft model writes its drafts' K/V there."""
        if not self.num_lookahead_tokens or end < request.num_tokens or not self._speculate():
            return 0
        return max(min(self.num_lookahead_tokens, self.config.max_model_len - end), 0)

    def _cached_prefix(self, request: Request) -> CachedPrefix:
        """The cached prefix a request may start from: none while its prompt logprobs are still to be computed
        (every prompt position must run through the model, as in vLLM)."""
        if request.sampling_params.prompt_logprobs is not None and not request.output_token_ids:
            return CachedPrefix()
        return self.kv_manager.find_cached_prefix(request.all_token_ids)

    def _num_new_tokens(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        computed = request.num_computed_tokens if num_computed is None else num_computed
        remaining = request.num_tokens - computed
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0
        return min(remaining, budget)

    def _drafts(self, request: Request, num_new: int, budget: int, speculate: bool) -> list[int]:
        """The request's draft tokens that this step verifies: only for a decode (its one known token is the last),
        and only as many as the budget, the context and max_tokens leave room for (the verified token and the
        runner's extra one each count), and with an int4 cache as leave the block unfilled."""
        drafts, request.draft_token_ids = request.draft_token_ids, []  # a draft is verified once or dropped
        if not (drafts and speculate) or request.num_computed_tokens + num_new != request.num_tokens:
            return []
        room = min(budget - num_new, self.config.max_model_len - request.num_tokens,
                   request.max_tokens - request.num_output_tokens - 1)
        if self.quantizes_full_blocks:  # the drafts stay before the last slot of the last known token's block
            size = self.kv_manager.block_size
            room = min(room, size - 2 - (request.num_tokens - 1) % size)
        return drafts[:max(room, 0)]

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate blocks for `request` (and its lookahead), preempting the newest running requests until they
        fit."""
        end = request.num_computed_tokens + num_new
        needed = end + self._lookahead(request, end)
        while not self.kv_manager.allocate_slots(request.request_id, needed):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule(self, request: Request, num_new: int, output: SchedulerOutput) -> None:
        """Add the request to the step: all of it if the runner does not hold it, else what changed."""
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        request_id = request.request_id
        table = self.kv_manager.block_table(request_id)
        view = self._runner_views.get(request_id)
        if view is None:
            self._runner_views[request_id] = _RunnerView(request.num_tokens, len(table))
            output.scheduled_new_reqs.append(NewRequestData(
                request_id, request.prompt_token_ids, list(request.output_token_ids), request.sampling_params,
                request.eos_token_ids, list(table), request.num_computed_tokens))
        else:
            output.scheduled_cached_reqs.append(CachedRequestData(
                request_id, request.all_token_ids[view.num_token_ids:], table[view.num_block_ids:],
                request.num_computed_tokens))
            view.num_token_ids, view.num_block_ids = request.num_tokens, len(table)
        output.num_scheduled_tokens[request_id] = num_new

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first in line; it will recompute its tokens."""
        self.kv_manager.free(request.request_id)
        self._runner_views.pop(request.request_id, None)  # the runner drops it too (preempted_req_ids)
        request.num_computed_tokens = 0
        request.draft_token_ids = []
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, runner_output: ModelRunnerOutput,
               stop: StopCheck = check_stop) -> list[Request]:
        """Credit the accepted tokens, append the sampled ones until one finishes its request (as `stop` decides,
        once per token); returns the requests with new tokens."""
        sampled = dict(zip(runner_output.req_ids, runner_output.sampled_token_ids, strict=True))
        drafts = output.scheduled_spec_decode_tokens
        updated: list[Request] = []
        now = time.monotonic()
        for request_id, num_scheduled in output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            token_ids = sampled.get(request_id, [])
            num_drafts = len(drafts[request_id]) if request_id in drafts else 0
            if num_drafts:
                self.spec_stats.record(num_drafts, len(token_ids) - 1)
            request.num_computed_tokens += num_scheduled - num_rejected_drafts(num_drafts, len(token_ids))
            self.kv_manager.cache_full_blocks(request_id, request.all_token_ids, request.num_computed_tokens)
            if not token_ids:
                continue  # a prompt chunk: no token yet
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            for token_id in token_ids:
                request.append_token(token_id)
                status = stop(request)
                if status is not None:
                    self.finish_request(request_id, status)
                    break
            else:
                request.draft_token_ids = runner_output.draft_token_ids.get(request_id, [])
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
        self._runner_views.pop(request_id, None)
        self._finished_since_last_step.append(request_id)
        return request
