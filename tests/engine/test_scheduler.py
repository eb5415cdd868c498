"""Scheduler with fake runner outputs: budgets, chunking, preemption order, block accounting, the diffs it sends
and how it credits what the runner sampled."""

import pickle

from kvserve.config import SchedulerConfig
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.sched_output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from kvserve.engine.scheduler import Scheduler
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


def sampling(scheduler: Scheduler, output: SchedulerOutput) -> list[str]:
    """Requests whose step reaches the end of their known tokens (call before update)."""
    requests = scheduler.requests
    return [request_id for request_id, count in output.num_scheduled_tokens.items()
            if requests[request_id].num_computed_tokens + count == requests[request_id].num_tokens]


def runner_output(output: SchedulerOutput, sampled: dict[str, list[int]]) -> ModelRunnerOutput:
    """What a runner returns: a token list for every scheduled request (empty where it sampled nothing)."""
    req_ids = list(output.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids, [sampled.get(r, []) for r in req_ids], [None] * len(req_ids))


def fake_step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule, then pretend the runner sampled `token` for every request that reached its end."""
    output = scheduler.schedule()
    scheduler.update(output, runner_output(output, {r: [token] for r in sampling(scheduler, output)}))
    return output


def counts(output: SchedulerOutput) -> dict[str, int]:
    return dict(output.num_scheduled_tokens)


def test_token_budget_chunks_long_prompt_and_shares_step_with_decodes():
    scheduler = make_scheduler(budget=8)
    scheduler.add_request(make_request("short", 3))
    assert counts(fake_step(scheduler)) == {"short": 3}
    scheduler.add_request(make_request("long", 20))
    # The decode goes first (1 token), the long prompt takes the rest of the budget.
    assert counts(fake_step(scheduler)) == {"short": 1, "long": 7}
    assert counts(fake_step(scheduler)) == {"short": 1, "long": 7}
    step = scheduler.schedule()
    assert counts(step) == {"short": 1, "long": 6} and step.total_num_scheduled_tokens == 7
    assert sampling(scheduler, step) == ["short", "long"]
    scheduler.update(step, runner_output(step, {"short": [7], "long": [7]}))
    long = scheduler.requests["long"]
    assert long.num_computed_tokens == 20 and long.output_token_ids == [7]


def test_prompt_chunks_do_not_sample():
    scheduler = make_scheduler(budget=5)
    scheduler.add_request(make_request("a", 12))
    for expected in (5, 5):
        step = scheduler.schedule()
        assert counts(step) == {"a": expected} and sampling(scheduler, step) == []
        scheduler.update(step, runner_output(step, {}))
    step = scheduler.schedule()
    assert counts(step) == {"a": 2} and sampling(scheduler, step) == ["a"]


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
    scheduler.update(output, runner_output(output, {"len": [5], "eos": [EOS]}))
    assert scheduler.requests.keys() == {"len"}
    output = scheduler.schedule()
    scheduler.update(output, runner_output(output, {"len": [5]}))
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
    assert output.preempted_req_ids == ["new"]
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
    assert scheduler.schedule().finished_req_ids == ["run", "wait"]


def test_request_aborted_during_a_step_is_not_updated():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3))
    output = scheduler.schedule()
    request = scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.update(output, runner_output(output, {"a": [9]}))
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


# ---- the contract: what is sent, what is credited ---------------------------------------------


def test_new_request_data_once_then_diffs():
    scheduler = make_scheduler(block_size=4)
    scheduler.add_request(make_request("a", 6, max_tokens=10))
    first = fake_step(scheduler)
    [new] = first.scheduled_new_reqs
    assert not first.scheduled_cached_reqs
    assert (new.req_id, new.prompt_token_ids, new.output_token_ids, new.num_computed_tokens) == \
        ("a", [1, 2, 3, 4, 5, 6], [], 0)
    assert new.block_ids == scheduler.kv_manager.block_table("a") and len(new.block_ids) == 2
    second = fake_step(scheduler, token=8)  # computes token 7 (position 6): no new block
    assert not second.scheduled_new_reqs
    assert second.scheduled_cached_reqs == [CachedRequestData("a", [7], [], 6)]
    third = fake_step(scheduler)  # position 7 fills the second block
    assert third.scheduled_cached_reqs == [CachedRequestData("a", [8], [], 7)]
    fourth = fake_step(scheduler)  # position 8 needs a third block
    table = scheduler.kv_manager.block_table("a")
    assert fourth.scheduled_cached_reqs == [CachedRequestData("a", [7], table[2:], 8)] and len(table) == 3


def test_preempted_request_is_sent_whole_again_with_its_output_so_far():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    scheduler.add_request(make_request("old", 6, max_tokens=8))
    scheduler.add_request(make_request("new", 6, max_tokens=8))
    while not scheduler.num_preemptions:
        fake_step(scheduler)
    new = scheduler.requests["new"]
    output_before = list(new.output_token_ids)
    resent: list[NewRequestData] = []
    while not resent:
        resent = [data for data in fake_step(scheduler).scheduled_new_reqs if data.req_id == "new"]
    [data] = resent
    assert data.output_token_ids == output_before and data.num_computed_tokens == 0
    assert data.prompt_token_ids == new.prompt_token_ids


def verify_step(scheduler: Scheduler, drafts: list[int], sampled: list[int]) -> None:
    """A speculative step for request "a": its last token plus `drafts`, answered with `sampled`."""
    output = scheduler.schedule()
    output.num_scheduled_tokens["a"] = 1 + len(drafts)
    output.scheduled_spec_decode_tokens["a"] = drafts
    scheduler.update(output, runner_output(output, {"a": sampled}))


def test_several_sampled_tokens_are_credited_and_rejected_drafts_are_not():
    scheduler = make_scheduler(block_size=16)
    scheduler.add_request(make_request("a", 3, max_tokens=10))
    fake_step(scheduler)  # prefill: token 7 sampled, 3 computed
    request = scheduler.requests["a"]
    verify_step(scheduler, [11, 12], [11, 12, 13])  # both drafts accepted, plus a bonus token
    assert request.output_token_ids == [7, 11, 12, 13]
    assert request.num_computed_tokens == 6 == request.num_tokens - 1
    verify_step(scheduler, [21, 22], [21, 99])  # the second draft rejected, replaced by the runner's token
    assert request.output_token_ids == [7, 11, 12, 13, 21, 99]
    assert request.num_computed_tokens == 8 == request.num_tokens - 1  # the rejected draft is not credited


def test_tokens_after_the_one_that_stops_a_request_are_dropped():
    scheduler = make_scheduler(block_size=16)
    scheduler.add_request(make_request("a", 3, max_tokens=10))
    fake_step(scheduler)
    request = scheduler.requests["a"]
    verify_step(scheduler, [5, EOS], [5, EOS, 6])
    assert request.output_token_ids == [7, 5, EOS]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert scheduler.kv_manager.pool.num_free_blocks == scheduler.kv_manager.num_blocks


def test_scheduler_and_runner_outputs_pickle():
    scheduler = make_scheduler(block_size=4)
    scheduler.add_request(make_request("a", 6))
    scheduler.add_request(make_request("b", 3))
    fake_step(scheduler)
    scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)
    scheduler.add_request(make_request("c", 5))
    output = scheduler.schedule()
    assert [type(d) for d in output.scheduled_cached_reqs + output.scheduled_new_reqs] == \
        [CachedRequestData, NewRequestData]
    assert output.finished_req_ids == ["b"]
    assert pickle.loads(pickle.dumps(output)) == output
    sampled = runner_output(output, {"a": [7], "c": [8]})
    sampled.logprobs = [[{7: -0.5}], None]
    assert pickle.loads(pickle.dumps(sampled)) == sampled


def step_proposing(scheduler: Scheduler, drafts: dict[str, list[int]], token: int = 7) -> SchedulerOutput:
    """A fake step whose runner also proposes `drafts` for the next one."""
    output = scheduler.schedule()
    answer = runner_output(output, {r: [token] for r in sampling(scheduler, output)})
    answer.draft_token_ids = drafts
    scheduler.update(output, answer)
    return output


def test_drafts_are_verified_after_the_last_token_within_max_tokens_budget_and_context():
    scheduler = make_scheduler(block_size=4, budget=16, max_model_len=64)
    scheduler.add_request(make_request("a", 3, max_tokens=10))
    step_proposing(scheduler, {"a": [11, 12, 13, 14, 15]})  # prefill: token 7 sampled, drafts for the next step
    output = scheduler.schedule()
    assert output.scheduled_spec_decode_tokens == {"a": [11, 12, 13, 14, 15]}
    assert counts(output) == {"a": 6}  # the sampled token plus five drafts
    assert scheduler.requests["a"].draft_token_ids == []  # verified once, then gone
    assert len(scheduler.kv_manager.block_table("a")) == 3  # 3 + 6 tokens in blocks of 4

    for limits, expected in [({"max_tokens": 3}, [11]),  # one output so far, one more for the runner's token
                             ({"budget": 4}, [11, 12, 13]),
                             ({"max_model_len": 6}, [11, 12])]:  # 4 tokens known, room for 2 more
        scheduler = make_scheduler(block_size=4, budget=limits.get("budget", 16),
                                   max_model_len=limits.get("max_model_len", 64))
        scheduler.add_request(make_request("a", 3, max_tokens=limits.get("max_tokens", 10)))
        step_proposing(scheduler, {"a": [11, 12, 13, 14, 15]})
        assert scheduler.schedule().scheduled_spec_decode_tokens == {"a": expected}, limits


def test_no_drafts_above_the_batch_threshold_nor_after_a_preemption():
    scheduler = make_scheduler(block_size=4, budget=16)
    scheduler.spec_max_batch = 1
    scheduler.add_request(make_request("a", 3, max_tokens=10))
    scheduler.add_request(make_request("b", 3, max_tokens=10))
    step_proposing(scheduler, {"a": [11, 12], "b": [21, 22]})
    output = scheduler.schedule()
    assert output.scheduled_spec_decode_tokens == {} and not output.propose_drafts  # two running > 1

    scheduler = make_scheduler(num_blocks=3, block_size=4, budget=16)
    scheduler.add_request(make_request("old", 4, max_tokens=10))
    scheduler.add_request(make_request("new", 4, max_tokens=10))
    step_proposing(scheduler, {"old": [11, 12, 13], "new": [21, 22, 23]})
    output = scheduler.schedule()  # "old" verifying 3 drafts needs a second block: "new" is preempted
    assert output.preempted_req_ids == ["new"]
    assert output.scheduled_spec_decode_tokens == {"old": [11, 12, 13]}
    assert scheduler.requests["new"].draft_token_ids == []


def test_a_draft_model_gets_lookahead_slots_when_its_request_samples():
    """num_lookahead_tokens slots past the step's tokens, for the draft's K/V: only for a step that reaches the
    request's last token, within max_model_len, and not while drafts are off."""
    scheduler = make_scheduler(block_size=4, budget=4, max_model_len=12)
    scheduler.num_lookahead_tokens = 3
    scheduler.add_request(make_request("a", 6, max_tokens=10))
    step_proposing(scheduler, {})  # a 4-token prompt chunk: no lookahead
    assert len(scheduler.kv_manager.block_table("a")) == 1
    step_proposing(scheduler, {"a": [11, 12]})  # the last 2 prompt tokens + 3 slots: 9 tokens
    assert len(scheduler.kv_manager.block_table("a")) == 3
    scheduler.schedule()  # verifies 2 drafts: 7 tokens known + 2 drafts = 9, + 3 slots capped at 12
    assert len(scheduler.kv_manager.block_table("a")) == 3

    scheduler = make_scheduler(block_size=4, budget=16)
    scheduler.num_lookahead_tokens, scheduler.spec_max_batch = 1, 1
    scheduler.add_request(make_request("a", 3, max_tokens=10))
    scheduler.add_request(make_request("b", 3, max_tokens=10))
    step_proposing(scheduler, {})  # admitted while fewer ran: 3 tokens + 1 slot each
    scheduler.schedule()  # two running > 1: 4 tokens, no slot (a fifth would take a second block)
    assert [len(scheduler.kv_manager.block_table(r)) for r in "ab"] == [1, 1]


def test_with_an_int4_cache_drafts_never_fill_a_block():
    """A filled int4 block is quantized with every token in it, rejected drafts too: verify steps stop short."""
    for prompt_len, expected in [(3, [11, 12, 13]), (5, [11]), (6, [])]:  # blocks of 8: token at 3, 5, 6
        scheduler = make_scheduler(block_size=8, budget=16)
        scheduler.quantizes_full_blocks = True
        scheduler.add_request(make_request("a", prompt_len, max_tokens=10))
        step_proposing(scheduler, {"a": [11, 12, 13, 14, 15]})
        assert scheduler.schedule().scheduled_spec_decode_tokens.get("a", []) == expected, prompt_len
