"""Gemma 3's sliding-window layers on the Triton kernels (decode from each request's first visible key, prefill
masked to the window over tables that start past the freed blocks) against transformers: a tiny random model
whose prompts run 6x past its window, batched, chunked over small blocks that slide often, and from cached
prefixes. Under Triton's interpreter without a GPU (TRITON_INTERPRET=1, set before triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_gemma import LAYOUTS, NUM_NEW_TOKENS, PROMPTS, make_gemma, reference  # noqa: E402

from kvserve import LLM, SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, word_tokenizer):
    path = tmp_path_factory.mktemp("gemma3-triton")
    model = make_gemma(len(word_tokenizer), LAYOUTS["five-to-one"])
    model.save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return path, [reference(model, prompt) for prompt in PROMPTS]


def generate(path, backend: str, options: dict) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
    """Greedy tokens and each step's top-5 logprobs, twice (the second pass from cached prefixes)."""
    llm = LLM(model=str(path), device=DEVICE, attention_backend=backend, kv_cache_memory=8 * 2**20,
              show_progress=False, **options)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=5)
    tokens, logprobs = [], []
    for _ in ("miss", "hit"):
        for output in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False):
            tokens.append(output.outputs[0].token_ids)
            logprobs.append(output.outputs[0].logprobs)
    assert llm.engine.kv_manager.pool.num_free_blocks == llm.engine.kv_manager.num_blocks  # nothing leaked
    return tokens, logprobs


@pytest.mark.parametrize("options", [
    {},  # the whole batch in one step: long prompts prefilled past the window at once
    {"max_num_batched_tokens": 16, "block_size": 4},  # chunks over tables that start past the freed blocks
], ids=["batched", "chunked"])
def test_tiny_gemma3_on_triton_matches_the_torch_masks_and_transformers(gemma3_dir, options):
    """Greedy tokens equal transformers'; the log-probabilities equal the torch backend's (its dense masks, the
    oracle), which a window off by a few keys moves (this tiny model's greedy tokens alone would not show it)."""
    path, expected = gemma3_dir
    tokens, logprobs = generate(path, "triton", options)
    reference_tokens, reference_logprobs = generate(path, "torch", options)
    assert tokens == reference_tokens == expected + expected
    for got, want in zip(logprobs, reference_logprobs, strict=True):
        for step, reference_step in zip(got, want, strict=True):
            assert step.keys() == reference_step.keys()
            torch.testing.assert_close(torch.tensor(list(step.values())), torch.tensor(list(reference_step.values())),
                                       atol=2e-4, rtol=0)
