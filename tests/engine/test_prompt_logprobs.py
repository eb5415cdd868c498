"""Prompt logprobs through the engine on the bundled model: equal to one plain forward of the whole prompt, with
chunked prefill, in a batch, past the prefix cache, with n > 1 and after a preemption."""

from __future__ import annotations

import dataclasses

import pytest
from logprobs_reference import assert_matches_reference, full_forward_logprobs

from kvserve import LLM, SamplingParams

PROMPTS = ["The capital of France is Paris, and the capital of Germany is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
           "请用中文介绍一下长城。长城是"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory=64 * 2**20, show_progress=False)


@pytest.fixture(scope="module")
def prompt_ids(llm: LLM) -> list[list[int]]:
    return [llm.get_tokenizer().encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def references(llm: LLM, prompt_ids: list[list[int]]) -> list:
    return [full_forward_logprobs(llm.engine.runner, ids) for ids in prompt_ids]


def with_prompt_logprobs(num_top: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=num_top, **kwargs)


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_prompt_logprobs_equal_a_full_forward(llm, prompt_ids, references, num_top) -> None:
    outputs = llm.generate(PROMPTS, with_prompt_logprobs(num_top), use_tqdm=False)  # one batch of three
    for output, ids, reference in zip(outputs, prompt_ids, references, strict=True):
        assert output.prompt_token_ids == ids
        assert_matches_reference(output.prompt_logprobs, ids, reference, num_top)


def test_chunked_prefill_scores_every_chunk(llm, prompt_ids, references) -> None:
    scheduler = llm.engine.scheduler
    config = scheduler.config
    scheduler.config = dataclasses.replace(config, max_num_batched_tokens=5)  # prompts of 12-20 tokens: 3-4 chunks
    try:
        outputs = llm.generate(PROMPTS, with_prompt_logprobs(2), use_tqdm=False)
    finally:
        scheduler.config = config
    for output, ids, reference in zip(outputs, prompt_ids, references, strict=True):
        assert_matches_reference(output.prompt_logprobs, ids, reference, 2)


def test_a_cached_prompt_is_computed_again(llm, prompt_ids) -> None:
    ids = prompt_ids[0] * 4  # several full blocks
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)  # caches its blocks
    [warm] = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert warm.num_cached_tokens > 0  # the prefix cache would serve it
    [output] = llm.generate({"prompt_token_ids": ids}, with_prompt_logprobs(1), use_tqdm=False)
    assert output.num_cached_tokens == 0
    assert_matches_reference(output.prompt_logprobs, ids, full_forward_logprobs(llm.engine.runner, ids), 1)


def test_n_samples_share_one_list_and_sampling_is_unchanged(llm, prompt_ids, references) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    [plain] = llm.generate({"prompt_token_ids": prompt_ids[1]}, params, use_tqdm=False)
    [scored] = llm.generate({"prompt_token_ids": prompt_ids[1]},
                            dataclasses.replace(params, prompt_logprobs=0), use_tqdm=False)
    assert [c.token_ids for c in scored.outputs] == [c.token_ids for c in plain.outputs]
    assert plain.prompt_logprobs is None
    assert_matches_reference(scored.prompt_logprobs, prompt_ids[1], references[1], 0)


def test_one_token_prompt_has_only_none(llm) -> None:
    [output] = llm.generate({"prompt_token_ids": [42]}, with_prompt_logprobs(3), use_tqdm=False)
    assert output.prompt_logprobs == [None]


def test_preempted_mid_prompt_scores_each_position_once(llm, prompt_ids, references, monkeypatch) -> None:
    """The first prompt chunk runs, then the request is preempted: recomputed from scratch, its list is whole."""
    scheduler = llm.engine.scheduler
    config = scheduler.config
    scheduler.config = dataclasses.replace(config, max_num_batched_tokens=6)
    ids = prompt_ids[2]
    llm.engine.add_request("preempt", {"prompt_token_ids": ids}, with_prompt_logprobs(1))
    try:
        assert llm.engine.step() == []  # the first chunk: no token yet
        request = scheduler.running[0]
        assert 0 < request.num_computed_tokens < len(ids) - 1
        scheduler._preempt(scheduler.running.pop())
        outputs = []
        while llm.engine.has_unfinished_requests():
            outputs.extend(llm.engine.step())
    finally:
        scheduler.config = config
    final = outputs[-1]
    assert final.finished and request.num_preemptions == 1
    assert_matches_reference(final.prompt_logprobs, ids, references[2], 1)
    assert llm.stats().kv_blocks_used == 0
