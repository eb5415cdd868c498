"""Scheduler with fake runner outputs: budgets, chunking, preemption order, block accounting."""

from kvserve.config import SchedulerConfig
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.scheduler import SampledTokens, Scheduler, SchedulerOutput
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.sampling_params import SamplingParams

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, chunked=True,
                   max_model_len=64, prefix_caching=False) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             max_model_len=max_model_len, enable_chunked_prefill=chunked)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, prefix_caching))


def make_request(request_id: str, prompt_len: int, max_tokens: int = 4) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Request(request_id, list(range(1, prompt_len + 1)), params, max_tokens,
                   frozenset({EOS}))


def fake_step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule, then pretend the runner sampled `token` for every request that reached its end."""
    output = scheduler.schedule()
    sampled = {s.request.request_id: token for s in output.scheduled if s.is_sampling}
    scheduler.update(output, SampledTokens(sampled))
    return output


def counts(output: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in output.scheduled}


def test_token_budget_chunks_long_prompt_and_shares_step_with_decodes():
    scheduler = make_scheduler(budget=8)
    scheduler.add_request(make_request("short", 3))
    assert counts(fake_step(scheduler)) == {"short": 3}
    scheduler.add_request(make_request("long", 20))
    # The decode goes first (1 token), the long prompt takes the rest of the budget.
    assert counts(fake_step(scheduler)) == {"short": 1, "long": 7}
    assert counts(fake_step(scheduler)) == {"short": 1, "long": 7}
    step = fake_step(scheduler)
    assert counts(step) == {"short": 1, "long": 6}
    assert [s.is_sampling for s in step.scheduled] == [True, True]
    long = scheduler.requests["long"]
    assert long.num_computed_tokens == 20 and long.output_token_ids == [7]


def test_prompt_chunks_do_not_sample():
    scheduler = make_scheduler(budget=5)
    scheduler.add_request(make_request("a", 12))
    for expected in (5, 5):
        step = fake_step(scheduler)
        assert counts(step) == {"a": expected} and not step.scheduled[0].is_sampling
    step = fake_step(scheduler)
    assert counts(step) == {"a": 2} and step.scheduled[0].is_sampling


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    scheduler = make_scheduler(budget=16, chunked=False, max_model_len=16)
    scheduler.add_request(make_request("a", 10))
    scheduler.add_request(make_request("b", 10))
    assert counts(fake_step(scheduler)) == {"a": 10}
    assert counts(fake_step(scheduler)) == {"a": 1, "b": 10}


def test_max_num_seqs_limits_running():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add_request(make_request(name, 2))
    assert set(counts(fake_step(scheduler))) == {"a", "b"}
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_finishes_on_max_tokens_and_eos_and_frees_blocks():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("len", 3, max_tokens=2))
    scheduler.add_request(make_request("eos", 3, max_tokens=10))
    output = scheduler.schedule()
    scheduler.update(output, SampledTokens({"len": 5, "eos": EOS}))
    assert scheduler.requests.keys() == {"len"}
    output = scheduler.schedule()
    scheduler.update(output, SampledTokens({"len": 5}))
    assert not scheduler.requests
    assert scheduler.kv_manager.pool.num_free_blocks == scheduler.kv_manager.num_blocks


def test_preempts_newest_and_recomputes_it_later():
    # 4 blocks of 4 tokens: two 6-token prompts take 2 blocks each; the first decode that
    # needs a third block forces the newest request out.
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    scheduler.add_request(make_request("old", 6, max_tokens=8))
    scheduler.add_request(make_request("new", 6, max_tokens=8))
    fake_step(scheduler)  # both prefilled, one token each (7 tokens known, 6 cached)
    fake_step(scheduler)  # decode: each now 7 cached -> 2 blocks each, still fits
    output = fake_step(scheduler)  # decode 8th token: fits exactly in 2 blocks
    assert counts(output) == {"old": 1, "new": 1}
    output = fake_step(scheduler)  # 9th token of "old" needs a 3rd block: "new" is preempted
    assert output.preempted_request_ids == ["new"]
    assert counts(output) == {"old": 1}
    new = scheduler.requests["new"]
    assert new.status == RequestStatus.WAITING and new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and scheduler.waiting[0] is new
    while scheduler.requests:
        fake_step(scheduler)
    assert new.output_token_ids == [7] * 8  # recomputed, then carried on to max_tokens
    assert scheduler.kv_manager.pool.num_free_blocks == 4


def test_request_preempts_itself_when_alone_and_out_of_blocks_then_resumes():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    scheduler.add_request(make_request("a", 3, max_tokens=4))
    scheduler.add_request(make_request("b", 3, max_tokens=4))
    while scheduler.requests:
        fake_step(scheduler)
    assert scheduler.num_preemptions >= 1
    assert scheduler.kv_manager.pool.num_free_blocks == 2


def test_abort_frees_blocks_of_waiting_and_running():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("run", 5))
    scheduler.add_request(make_request("wait", 5))
    fake_step(scheduler)
    scheduler.finish_request("run", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("wait", RequestStatus.FINISHED_ABORTED)
    assert scheduler.finish_request("gone", RequestStatus.FINISHED_ABORTED) is None
    assert scheduler.num_unfinished == 0
    assert scheduler.kv_manager.pool.num_free_blocks == scheduler.kv_manager.num_blocks
    assert scheduler.schedule().finished_request_ids == ["run", "wait"]


def test_request_aborted_during_a_step_is_not_updated():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3))
    output = scheduler.schedule()
    request = scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.update(output, SampledTokens({"a": 9}))
    assert request.output_token_ids == []


def test_prefix_cache_hit_skips_cached_blocks_and_shares_them():
    scheduler = make_scheduler(prefix_caching=True)
    scheduler.add_request(make_request("first", 10))
    fake_step(scheduler)  # 10 tokens computed: blocks [0-3] and [4-7] are full and cached
    scheduler.add_request(make_request("second", 10))
    assert counts(fake_step(scheduler)) == {"first": 1, "second": 2}
    second = scheduler.requests["second"]
    assert second.num_cached_tokens == 8
    first_table = scheduler.kv_manager.block_table("first")
    assert scheduler.kv_manager.block_table("second")[:2] == first_table[:2]
    assert all(scheduler.kv_manager.pool.ref_count(b) == 2 for b in first_table[:2])


def test_fully_cached_prompt_still_computes_its_last_token():
    scheduler = make_scheduler(prefix_caching=True)
    scheduler.add_request(make_request("first", 8))
    fake_step(scheduler)
    scheduler.add_request(make_request("second", 8))
    step = fake_step(scheduler)
    assert counts(step)["second"] == 4  # the last block is recomputed: logits need a query token
    assert scheduler.requests["second"].num_cached_tokens == 4


def test_preempted_request_reuses_its_own_freed_blocks():
    scheduler = make_scheduler(num_blocks=4, block_size=4, prefix_caching=True)
    scheduler.add_request(make_request("old", 6, max_tokens=8))
    scheduler.add_request(make_request("new", 6, max_tokens=8))
    while not scheduler.num_preemptions:
        fake_step(scheduler)
    new = scheduler.requests["new"]
    while new.status != RequestStatus.RUNNING and scheduler.requests:
        fake_step(scheduler)
    while scheduler.requests:
        fake_step(scheduler)
    assert new.output_token_ids == [7] * 8
    assert scheduler.kv_manager.pool.num_free_blocks == 4
