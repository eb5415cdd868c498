"""Triton paged-attention kernels compiled on CUDA against torch_ref on the same GPU, in float32 and bfloat16.

Larger shapes than the interpreter tests can afford (SmolLM2 / Qwen3 head layouts, 8k contexts).
Skips without a GPU, and in a process where TRITON_INTERPRET=1 already made the kernels interpreted.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch
from paged_cases import Step, assert_same_cache, backend_for, clone_cache, make_step, run_backend

from kvserve.attention import torch_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1: kernels are interpreted in this process; run `pytest -m gpu`"),
]

# bfloat16: torch_ref (SDPA) and the kernels round differently; float32 must agree tightly.
TOLERANCES = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2}}
# (num_kv_heads, group, head_dim): SmolLM2-135M (9 / 3, 64), Qwen3-0.6B (16 / 8, 128), a wide GQA, MHA.
LAYOUTS = [(3, 3, 64), (8, 2, 128), (2, 8, 128), (4, 1, 64)]


@pytest.fixture(scope="module")
def ta() -> ModuleType:
    """The kernels module, imported only once the skips have passed (compiled, not interpreted)."""
    triton_attention = pytest.importorskip("kvserve.attention.triton_attention")
    if triton_attention.IS_INTERPRETED:
        pytest.skip("triton_attention was imported under TRITON_INTERPRET=1")
    return triton_attention


def _check(ta: ModuleType, step: Step, dtype: torch.dtype) -> None:
    expected_cache = clone_cache(step.cache)
    expected = torch_ref.paged_attention(step.query, step.key, step.value, expected_cache, step.metadata,
                                         step.scale)
    out = run_backend(backend_for("triton", step), step)
    torch.cuda.synchronize()
    assert_same_cache(step.cache, expected_cache)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_batch(ta: ModuleType, dtype: torch.dtype, kv_cache_dtype: str, layout: tuple[int, int, int],
                      block_size: int) -> None:
    num_kv_heads, group, head_dim = layout
    requests = [(n, 1) for n in (1, 2, 63, 64, 65, 511, 512, 513, 1500, 4097, 8192)]
    step = make_step(requests, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size,
                     kv_cache_dtype=kv_cache_dtype, dtype=dtype, device="cuda")
    _check(ta, step, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
def test_prefill_varlen(ta: ModuleType, dtype: torch.dtype, kv_cache_dtype: str,
                        layout: tuple[int, int, int]) -> None:
    num_kv_heads, group, head_dim = layout
    requests = [(4096, 4096), (3000, 1000), (17, 17), (2049, 2), (700, 65)]
    step = make_step(requests, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=16,
                     kv_cache_dtype=kv_cache_dtype, dtype=dtype, device="cuda")
    _check(ta, step, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_mixed_batch(ta: ModuleType, dtype: torch.dtype, kv_cache_dtype: str) -> None:
    requests = [(1, 1), (300, 1), (5000, 1), (1, 1), (512, 512), (1200, 200)]
    step = make_step(requests, num_kv_heads=8, group=2, head_dim=128, block_size=16,
                     kv_cache_dtype=kv_cache_dtype, dtype=dtype, device="cuda")
    _check(ta, step, dtype)


def test_auto_picks_triton_on_cuda(ta: ModuleType) -> None:
    from kvserve.attention.backend import AttentionRequirements
    from kvserve.attention.selector import create_attention_backend

    needs = AttentionRequirements(torch.device("cuda"), "bfloat16", use_window=False, use_mla=False)
    assert type(create_attention_backend("auto", needs)) is ta.TritonAttentionBackend
