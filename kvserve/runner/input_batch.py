"""The runner's own copy of the requests it holds, kept in step with the scheduler by SchedulerOutput diffs.

Pure Python: a step's inputs come out as plain lists (token ids, num_computed_tokens, num_new_tokens, block
tables) that the runner turns into tensors once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvserve.engine.sched_output import SchedulerOutput
from kvserve.kv.sinks_window import SinksWindow
from kvserve.sampling_params import SamplingParams
from kvserve.spec.draft_length import DraftLength

if TYPE_CHECKING:
    import numpy as np


@dataclass(slots=True)
class CachedRequestState:
    """What the runner knows of one request: its tokens, blocks and progress."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    all_token_ids: list[int]  # prompt + output: the step's input tokens are sliced from here
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_table: list[int]  # EVICTED where a window took blocks back, as in the KV manager
    num_computed_tokens: int
    num_evicted_blocks: int = 0
    drafting: DraftLength = field(default_factory=DraftLength)  # speculative decoding: drafts to propose next
    draft_num_computed: int = 0  # a draft model: leading tokens whose K/V the draft has written
    draft_fed: list[int] = field(default_factory=list)  # drafts the draft model fed itself after those

    def append_tokens(self, token_ids: list[int]) -> None:
        """Record tokens the scheduler appended (the ones sampled in earlier steps)."""
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)


@dataclass
class StepBatch:
    """One step's requests in batch order, decodes first (single-token queries, and decodes verifying drafts: the
    attention batches them)."""

    requests: list[CachedRequestState]
    num_computed_tokens: list[int]
    num_new_tokens: list[int]
    block_tables: list[list[int]]
    token_ids: list[int]  # the step's input tokens, packed request after request [T]
    sampling: list[int]  # indices of the requests whose step reaches their last known token: they sample
    # Per request, the draft tokens its step verifies after its last known token (speculative decoding; [] if none).
    drafts: list[list[int]] = field(default_factory=list)
    # Structured output, as the scheduler sent it (engine/sched_output.py): request ids and their bitmask rows.
    structured_output_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: np.ndarray | None = None
    propose_drafts: bool = True  # whether the next step will verify drafts (the scheduler's batch-size rule)

    @property
    def req_ids(self) -> list[str]:
        """Request ids in batch order."""
        return [state.req_id for state in self.requests]


class InputBatch:
    """Every request the runner holds, by id; `update` applies a SchedulerOutput and returns the step's batch."""

    def __init__(self, window: SinksWindow | None = None) -> None:
        self.window = window  # sinks + sliding window: evict the same columns as the KV manager
        self.requests: dict[str, CachedRequestState] = {}

    def update(self, output: SchedulerOutput) -> StepBatch:
        """Drop finished and preempted requests, add new ones, apply the diffs; the step's batch."""
        for req_id in output.finished_req_ids:
            self.requests.pop(req_id, None)
        for req_id in output.preempted_req_ids:
            self.requests.pop(req_id, None)  # rescheduled later as a new request
        for new in output.scheduled_new_reqs:
            state = CachedRequestState(
                new.req_id, new.prompt_token_ids, list(new.output_token_ids),
                [*new.prompt_token_ids, *new.output_token_ids], new.sampling_params, new.eos_token_ids,
                list(new.block_ids), new.num_computed_tokens, draft_num_computed=new.num_computed_tokens)
            self.requests[new.req_id] = state
            self._evict(state)
        for diff in output.scheduled_cached_reqs:
            state = self.requests[diff.req_id]
            if diff.new_token_ids:
                state.append_tokens(diff.new_token_ids)
            state.block_table.extend(diff.new_block_ids)
            state.num_computed_tokens = diff.num_computed_tokens
            self._evict(state)
        batch = self._batch(output.num_scheduled_tokens, output.scheduled_spec_decode_tokens)
        batch.structured_output_req_ids = output.structured_output_req_ids
        batch.grammar_bitmask = output.grammar_bitmask
        batch.propose_drafts = output.propose_drafts
        return batch

    def _evict(self, state: CachedRequestState) -> None:
        if self.window is not None:
            dead = self.window.evict(state.block_table, state.num_evicted_blocks, state.num_computed_tokens)
            state.num_evicted_blocks += len(dead)

    def _batch(self, num_scheduled_tokens: dict[str, int], spec_tokens: dict[str, list[int]]) -> StepBatch:
        # A stable sort: within decodes (verifying drafts or not) and within the rest, the scheduler's order.
        order = sorted(num_scheduled_tokens.items(), key=lambda item: item[1] - len(spec_tokens.get(item[0], ())) != 1)
        batch = StepBatch([], [], [], [], [], [])
        for index, (req_id, count) in enumerate(order):
            state = self.requests[req_id]
            start = state.num_computed_tokens
            drafts = spec_tokens.get(req_id, [])
            known = count - len(drafts)  # the step's tokens from the request's own, then its drafts
            batch.requests.append(state)
            batch.num_computed_tokens.append(start)
            batch.num_new_tokens.append(count)
            batch.block_tables.append(state.block_table)
            batch.token_ids.extend(state.all_token_ids[start:start + known])
            batch.token_ids.extend(drafts)
            batch.drafts.append(drafts)
            if start + known == len(state.all_token_ids):
                batch.sampling.append(index)
        return batch
