"""Prefix caching on the bundled model: reused token counts, and exact greedy equality with it off."""

import pytest

import kvserve.kv.kv_manager as kv_manager
from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SYSTEM = ("You are a meticulous assistant for a maritime museum. Answer visitors' questions about ships, "
          "navigation, lighthouses and the history of the harbour in two short sentences, politely, "
          "and say so plainly when you do not know.")
QUESTIONS = ["When was the lighthouse built?", "What is a sextant?", "Who sailed the first ferry?",
             "How deep is the harbour?", "What does port mean?", "Why are ships painted red below?"]


def conversations(llm: LLM) -> list[list[int]]:
    return [llm.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in QUESTIONS]


def run(llm: LLM, prompts: list[list[int]], one_by_one: bool = True):
    if one_by_one:  # sequential, so every request after the first can hit the cache
        return [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in prompts]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[int]], list[list[int]]]:
    plain = LLM(kv_cache_memory=32 * 2**20, enable_prefix_caching=False, show_progress=False)
    prompts = conversations(plain)
    outputs = run(plain, prompts)
    assert all(o.num_cached_tokens == 0 for o in outputs)
    return prompts, [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def cached_llm() -> LLM:
    return LLM(kv_cache_memory=32 * 2**20, show_progress=False)


def test_shared_system_prompt_is_reused_with_identical_output(cached_llm, reference):
    prompts, expected = reference
    outputs = run(cached_llm, prompts)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # The shared part is the system block of the template: every full 16-token block of it is reused.
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1], strict=False)) if a != b)
    assert outputs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == shared // 16 * 16 for o in outputs[1:])
    stats = cached_llm.stats()
    assert stats.prefix_cache_hits >= (len(prompts) - 1) * (shared // 16 * 16)
    assert stats.kv_blocks_used == 0


def test_batched_requests_with_shared_prefix_match(cached_llm, reference):
    prompts, expected = reference
    assert [o.outputs[0].token_ids for o in run(cached_llm, prompts, one_by_one=False)] == expected


def test_eviction_under_a_tiny_pool_keeps_outputs_exact(reference):
    prompts, expected = reference
    block_bytes = 16 * 30 * 2 * 3 * 64 * 4
    tiny = LLM(kv_cache_memory=12 * block_bytes, show_progress=False)
    outputs = run(tiny, prompts + prompts[::-1], one_by_one=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected + expected[::-1]
    assert tiny.stats().kv_blocks_used == 0


def test_forced_hash_collisions_never_return_wrong_blocks(cached_llm, reference, monkeypatch):
    prompts, expected = reference
    monkeypatch.setattr(kv_manager, "hash_block", lambda parent, tokens: 0)
    cached_llm.engine.kv_manager.pool.prefix_cache.__init__()  # forget blocks cached under real hashes
    assert [o.outputs[0].token_ids for o in run(cached_llm, prompts)] == expected
