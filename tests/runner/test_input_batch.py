"""The runner's copy of the requests (runner/input_batch.py), driven by a real scheduler's outputs: it must agree
with the scheduler after new requests, diffs, preemption and finishing, and with the KV manager's window."""

from __future__ import annotations

from kvserve.config import SchedulerConfig
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.sched_output import ModelRunnerOutput, SchedulerOutput
from kvserve.engine.scheduler import Scheduler
from kvserve.kv.kv_manager import EVICTED, KVCacheManager
from kvserve.kv.sinks_window import SinksWindow
from kvserve.runner.input_batch import InputBatch, StepBatch
from kvserve.sampling_params import SamplingParams


def make(num_blocks: int = 64, block_size: int = 4, budget: int = 16, window: int | None = None,
         num_sinks: int = 0) -> tuple[Scheduler, InputBatch]:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256,
                             enable_chunked_prefill=True)
    scheduler = Scheduler(config, KVCacheManager(num_blocks, block_size, False, window, num_sinks))
    return scheduler, InputBatch(None if window is None else SinksWindow(window, num_sinks, block_size))


def add(scheduler: Scheduler, request_id: str, prompt_len: int, max_tokens: int = 4) -> None:
    prompt = [100 + i for i in range(prompt_len)]
    scheduler.add_request(Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                  max_tokens))


def step(scheduler: Scheduler, batch: InputBatch) -> tuple[SchedulerOutput, StepBatch]:
    """One step with a fake sampler: request i of the batch samples token 10 + its output length."""
    output = scheduler.schedule()
    step_batch = batch.update(output)
    assert_agrees(scheduler, batch, step_batch)
    sampled = [[] for _ in step_batch.requests]
    for index in step_batch.sampling:
        sampled[index] = [10 + len(step_batch.requests[index].output_token_ids)]
    scheduler.update(output, ModelRunnerOutput(step_batch.req_ids, sampled, [None] * len(sampled)))
    return output, step_batch


def assert_agrees(scheduler: Scheduler, batch: InputBatch, step_batch: StepBatch) -> None:
    """The runner's state of every scheduled request is the scheduler's, and the packed inputs follow from it."""
    token_ids = []
    for state, start, count, table in zip(step_batch.requests, step_batch.num_computed_tokens,
                                          step_batch.num_new_tokens, step_batch.block_tables, strict=True):
        request = scheduler.requests[state.req_id]
        assert state.all_token_ids == request.all_token_ids
        assert state.output_token_ids == request.output_token_ids
        assert table == scheduler.kv_manager.block_table(state.req_id)
        assert start == request.num_computed_tokens
        token_ids += request.all_token_ids[start:start + count]
    assert step_batch.token_ids == token_ids
    counts = step_batch.num_new_tokens
    assert counts == sorted(counts, key=lambda n: n != 1)  # decodes first


def test_new_then_cached_diffs_keep_the_runner_in_step():
    scheduler, batch = make(budget=8)
    add(scheduler, "short", 3, max_tokens=6)
    _, first = step(scheduler, batch)
    assert first.req_ids == ["short"] and first.sampling == [0]
    add(scheduler, "long", 13, max_tokens=6)
    _, second = step(scheduler, batch)  # the decode first, then a chunk of the long prompt that samples nothing
    assert second.req_ids == ["short", "long"] and second.num_new_tokens == [1, 7] and second.sampling == [0]
    assert batch.requests["short"].output_token_ids == [10]  # the token sampled in the first step came as a diff
    while scheduler.requests:
        step(scheduler, batch)
    assert batch.requests.keys() == {"long"}  # finished in the last step: dropped with the next output
    step(scheduler, batch)
    assert not batch.requests


def test_preempted_request_is_dropped_then_rebuilt_with_its_output():
    scheduler, batch = make(num_blocks=4, block_size=4)
    add(scheduler, "old", 6, max_tokens=8)
    add(scheduler, "new", 6, max_tokens=8)
    output, _ = step(scheduler, batch)
    while not output.preempted_req_ids:
        output, _ = step(scheduler, batch)
    assert output.preempted_req_ids == ["new"] and "new" not in batch.requests
    while "new" not in batch.requests:
        step(scheduler, batch)
    state = batch.requests["new"]
    assert state.num_computed_tokens == 0 and len(state.output_token_ids) > 0  # recomputed from its tokens
    while scheduler.requests:
        step(scheduler, batch)
    assert scheduler.requests == {}


def test_aborted_request_is_dropped():
    scheduler, batch = make()
    add(scheduler, "a", 5)
    add(scheduler, "b", 5)
    step(scheduler, batch)
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    _, step_batch = step(scheduler, batch)
    assert step_batch.req_ids == ["b"] and batch.requests.keys() == {"b"}


def test_window_evictions_match_the_kv_manager_without_crossing_the_contract():
    scheduler, batch = make(num_blocks=16, block_size=4, budget=6, window=8, num_sinks=4)
    add(scheduler, "a", 30, max_tokens=20)
    add(scheduler, "b", 9, max_tokens=30)
    evicted = False
    while scheduler.requests:
        output, _ = step(scheduler, batch)  # step() checks the runner's tables equal the KV manager's
        for diff in output.scheduled_cached_reqs:
            assert EVICTED not in diff.new_block_ids
        evicted = evicted or any(EVICTED in state.block_table for state in batch.requests.values())
    assert evicted
