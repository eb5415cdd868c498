"""Quantized KV cache on the bundled model: perplexity on WikiText-2 stays close to the float cache."""

import math
import pathlib

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.attention.backend import AttentionMetadata, PrefillSeq

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2-raw-test.txt"
NUM_TOKENS = 1024
CHUNK = 64  # each chunk attends to the earlier ones through the (quantized) cache


def perplexity(llm: LLM, token_ids: list[int]) -> float:
    """Teacher-forced perplexity, computed chunk by chunk through the paged cache (engine idle)."""
    runner = llm.engine.runner
    table = torch.arange(-(-len(token_ids) // runner.block_size))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(token_ids) - 1, CHUNK):
            end = min(start + CHUNK, len(token_ids) - 1)
            metadata = AttentionMetadata(
                slot_mapping=torch.arange(start, end), num_decodes=0,
                decode_block_tables=torch.zeros(0, 0, dtype=torch.long),
                decode_mask=torch.zeros(0, 1, 1, 0, dtype=torch.bool),
                prefills=[PrefillSeq(0, end - start, end, table)])
            hidden = runner.model(torch.tensor(token_ids[start:end]), torch.arange(start, end),
                                  runner.kv_caches, metadata)
            logprobs = torch.log_softmax(runner.model.compute_logits(hidden), dim=-1)
            targets = torch.tensor(token_ids[start + 1:end + 1])
            nll -= logprobs.gather(1, targets[:, None]).sum().item()
            count += end - start
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def wikitext_ids() -> list[int]:
    if not DATA.exists():
        pytest.skip(f"WikiText-2 not found at {DATA}")
    text = DATA.read_text(encoding="utf-8")[:20000]
    llm = LLM(kv_cache_memory=64 * 2**20, show_progress=False)
    ids = llm.get_tokenizer().encode(text)[:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    return ids, perplexity(llm, ids)


@pytest.mark.parametrize(("kv_cache_dtype", "max_increase"), [("int8", 0.01), ("fp8", 0.01)])
def test_perplexity_increase_is_small(wikitext_ids, kv_cache_dtype, max_increase):
    ids, baseline = wikitext_ids
    llm = LLM(kv_cache_memory=64 * 2**20, kv_cache_dtype=kv_cache_dtype, show_progress=False)
    quantized = perplexity(llm, ids)
    assert quantized != baseline  # the cache really is quantized
    assert quantized / baseline - 1 < max_increase, (baseline, quantized)
    # The same budget buys more blocks: codes are 1 byte instead of 4, plus the scales.
    assert llm.engine.kv_bytes_per_token == 30 * (3 * 64 * 2 + 3 * 2 * 4)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_unknown_kv_cache_dtype_is_rejected():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(kv_cache_dtype="int3")
