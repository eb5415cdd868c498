"""The CPU platform: each float32 fast path follows its option, a host-BLAS step runs torch on one thread, the
process-wide settings are undone by shutdown, and the packed copies count in the model's memory."""

from __future__ import annotations

import sys

import pytest
import torch
from threadpoolctl import threadpool_info

from kvserve import LLM
from kvserve.config import EngineConfig
from kvserve.layers import native_ops, onednn
from kvserve.layers.embedding import VocabEmbedding
from kvserve.layers.linear import Linear
from kvserve.layers.norm import rms_norm
from kvserve.layers.quantization import UnquantizedLinearMethod
from kvserve.layers.quantization.cpu import CpuLinearMethod
from kvserve.layers.quantization.int8 import Int8LinearMethod
from kvserve.platforms import CpuPlatform, CudaPlatform, Platform, get_platform
from kvserve.platforms.host_malloc import keep_freed_memory

NATIVE = native_ops.available()


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_get_platform_by_device() -> None:
    assert type(get_platform(EngineConfig())) is CpuPlatform
    assert type(get_platform(EngineConfig.from_kwargs(device="cuda:0"))) is CudaPlatform
    assert type(get_platform(EngineConfig.from_kwargs(device="meta"))) is Platform


def test_default_float32_uses_every_fast_path_it_can() -> None:
    platform = CpuPlatform(EngineConfig())
    method = platform.linear_method(torch.float32)
    assert isinstance(method, CpuLinearMethod)
    assert method.use_gemv is NATIVE and method.use_packed is onednn.available()
    # With the compiled GEMV, no step needs OpenBLAS; without it, batch-1 steps do.
    assert platform.blas_step.max_tokens == (0 if NATIVE else 1)
    assert (platform.norm_kernel(torch.float32) is native_ops.rms_norm) is NATIVE


@pytest.mark.parametrize("option", ["cpu_native_kernels", "cpu_packed_weights", "cpu_blas_max_tokens"])
def test_each_fast_path_follows_its_option(option: str) -> None:
    platform = CpuPlatform(EngineConfig.from_kwargs(**{option: 0 if option == "cpu_blas_max_tokens" else False}))
    method = platform.linear_method(torch.float32)
    if option == "cpu_native_kernels":  # batch-1 matmuls fall back to OpenBLAS, norms to torch
        assert not method.use_gemv and platform.blas_step.max_tokens == 1
        assert platform.norm_kernel(torch.float32) is rms_norm
    elif option == "cpu_packed_weights":
        assert not method.use_packed
    else:
        assert platform.blas_step.max_tokens == 0


def test_other_dtypes_use_the_plain_method_and_torch_norm() -> None:
    platform = CpuPlatform(EngineConfig.from_kwargs(dtype="bfloat16"))
    assert type(platform.linear_method(torch.bfloat16)) is UnquantizedLinearMethod
    assert platform.norm_kernel(torch.bfloat16) is rms_norm
    assert platform.blas_step.max_tokens == 0
    with pytest.raises(ValueError, match="quantization 'gguf' is not supported"):
        platform.linear_method(torch.bfloat16, quantization="gguf")
    # The weight-only methods run anywhere, off the float32 kernels: on the dequantized weight.
    int8 = platform.linear_method(torch.bfloat16, quantization="int8")
    assert type(int8) is Int8LinearMethod and int8.kernels is None


def test_small_steps_without_the_gemv_run_openblas_with_torch_single_threaded() -> None:
    platform = CpuPlatform(EngineConfig.from_kwargs(cpu_native_kernels=False, cpu_blas_max_tokens=4))
    previous = torch.get_num_threads()
    with platform.step_context(num_tokens=4):
        assert platform.blas_step.active and torch.get_num_threads() == 1
    with platform.step_context(num_tokens=5):
        assert not platform.blas_step.active and torch.get_num_threads() == previous
    assert not platform.blas_step.active and torch.get_num_threads() == previous


def test_configure_sets_threads_and_restore_undoes_it() -> None:
    previous, blas_before = torch.get_num_threads(), _blas_threads()
    platform = CpuPlatform(EngineConfig.from_kwargs(num_threads=1))
    platform.configure()
    try:
        assert torch.get_num_threads() == 1
        assert all(n == 1 for n in _blas_threads())
    finally:
        platform.restore()
    assert torch.get_num_threads() == previous and _blas_threads() == blas_before


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(quantization="none", kv_cache_memory=16 * 2**20, max_num_batched_tokens=64, show_progress=False)


def test_engine_layers_get_the_platforms_kernels(llm: LLM) -> None:
    from kvserve.layers.norm import RMSNorm

    modules = list(llm.engine.runner.model.modules())
    methods = {type(m.method) for m in modules if isinstance(m, Linear) and not isinstance(m, VocabEmbedding)}
    assert methods == {CpuLinearMethod}
    assert type(llm.engine.runner.model.model.embed_tokens.method) is UnquantizedLinearMethod  # lookups only
    kernels = {m.kernel for m in modules if isinstance(m, RMSNorm)}
    assert kernels == {native_ops.rms_norm if NATIVE else rms_norm}


def test_packed_copies_are_counted_in_model_memory(llm: LLM) -> None:
    if not onednn.available():
        pytest.skip("this torch build has no oneDNN packed linear")
    runner = llm.engine.runner
    linears = [m for m in runner.model.modules() if isinstance(m, Linear) and not isinstance(m, VocabEmbedding)]
    plain = sum(m.weight.numel() * 4 for m in linears)  # the tied LM head is the embedding: counted once below
    assert runner.packed_weight_bytes == plain
    params = {p.data_ptr(): p.numel() * 4 for p in runner.model.parameters()}
    assert llm.stats().model_bytes == sum(params.values()) + plain


def test_engine_shutdown_restores_torch_threads() -> None:
    previous = torch.get_num_threads()
    engine_llm = LLM(kv_cache_memory=16 * 2**20, num_threads=1, show_progress=False)
    assert torch.get_num_threads() == 1
    engine_llm.engine.shutdown()
    assert torch.get_num_threads() == previous


def test_negative_cpu_blas_max_tokens_rejected() -> None:
    with pytest.raises(ValueError, match="cpu_blas_max_tokens must be >= 0, got -1"):
        LLM(cpu_blas_max_tokens=-1, show_progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_accepts_the_malloc_limits() -> None:
    assert keep_freed_memory()


def test_the_default_kv_budget_is_a_share_of_total_memory_capped_by_half_the_free(monkeypatch) -> None:
    from kvserve.platforms import base

    platform = get_platform(EngineConfig.from_kwargs(kv_cache_memory_fraction=0.25))
    memory = {"MemTotal": 32 * 2**30, "MemAvailable": 20 * 2**30}
    monkeypatch.setattr(base, "host_memory_bytes", lambda entry="MemTotal": memory[entry])
    monkeypatch.setattr(base, "available_memory_bytes", lambda device: memory["MemAvailable"])
    assert platform.kv_cache_budget(None, [], 1024) == 8 * 2**30  # a quarter of 32 GiB, whatever is free
    memory["MemAvailable"] = 12 * 2**30
    assert platform.kv_cache_budget(None, [], 1024) == 6 * 2**30  # half of what is free, when that is less
