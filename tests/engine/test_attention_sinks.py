"""Attention sinks + sliding window on the bundled model: bounded memory past the window, exact equivalences.

Each query sees exactly the sinks and its own last `kv_window` tokens however the work is split into steps,
so chunking and batching must not change a single token; with a window longer than the text, nothing is
evicted and the output is the plain path's.
"""

import pytest

from kvserve import LLM, SamplingParams

WINDOW, SINKS = 32, 4
PROMPT = ("The history of the lighthouse begins in antiquity, when fires were lit on hilltops to guide ships "
          "home. Over the centuries these beacons grew into towers of stone, and their keepers learned to tend "
          "oil lamps, then great lenses that threw a beam of light far out across the dark and restless water.")


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > WINDOW + SINKS  # the prompts themselves run past the window
    return [ids, ids[5:] + ids[:5], ids[:20]]


def test_window_longer_than_text_is_the_plain_path(prompts):
    plain = run(LLM(kv_cache_memory=32 * 2**20, show_progress=False), prompts, 24)
    windowed = run(LLM(kv_cache_memory=32 * 2**20, kv_window=128, max_num_batched_tokens=512, show_progress=False),
                   prompts, 24)
    assert windowed == plain


def test_generation_runs_far_past_the_cache_with_bounded_blocks(prompts):
    # 12 blocks of 16 tokens: 192 tokens of cache, for a 400-token sequence.
    budget = 12 * 16 * 46080
    llm = LLM(kv_cache_memory=budget, kv_window=WINDOW, kv_sinks=SINKS, max_model_len=1024,
              max_num_batched_tokens=32, show_progress=False)
    engine = llm.engine
    engine.add_request("long", {"prompt_token_ids": prompts[0]},
                       SamplingParams(temperature=0, max_tokens=400 - len(prompts[0]), ignore_eos=True))
    most_blocks, outputs = 0, []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        most_blocks = max(most_blocks, engine.kv_manager.pool.num_used_blocks)
    assert len(outputs[-1].outputs[0].token_ids) == 400 - len(prompts[0])
    # Sink block + window + one 32-token chunk, in 16-token blocks.
    assert most_blocks <= 1 + -(-(WINDOW - 1 + 32) // 16) + 1
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.num_blocks
    plain = LLM(kv_cache_memory=budget, max_num_batched_tokens=32, show_progress=False)
    assert plain.engine.max_model_len == 192  # without a window, the cache caps the context


def test_window_is_exact_across_chunking_and_batching(prompts):
    def windowed(**options: int) -> LLM:
        options = {"max_num_batched_tokens": 512, **options}  # 32 MiB holds a window and a 512-token chunk
        return LLM(kv_cache_memory=32 * 2**20, kv_window=WINDOW, kv_sinks=SINKS, show_progress=False, **options)

    alone = [run(windowed(), [p], 24)[0] for p in prompts]
    assert run(windowed(), prompts, 24) == alone
    assert run(windowed(max_num_batched_tokens=7), prompts, 24) == alone
    plain = run(LLM(kv_cache_memory=32 * 2**20, show_progress=False), prompts[:1], 24)[0]
    assert alone[0] != plain  # the window really changed what the model saw


def test_window_options_are_validated():
    with pytest.raises(ValueError, match="kv_window must be >= 1"):
        LLM(kv_window=0)
    with pytest.raises(ValueError, match="kv_sinks must be >= 0"):
        LLM(kv_window=8, kv_sinks=-1)
    with pytest.raises(ValueError, match="needs .* blocks per request"):
        LLM(kv_window=4096, kv_cache_memory=16 * 46080 * 8, show_progress=False)
