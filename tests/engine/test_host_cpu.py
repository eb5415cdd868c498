"""CPU host tuning: batch-1 decode takes the compiled GEMV (or, without it, numpy's OpenBLAS with torch
single-threaded), steps of several rows take oneDNN-packed weights, and glibc keeps freed memory."""

import sys

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.layers import host_blas, native_ops, onednn
from kvserve.layers.linear import Linear
from kvserve.runner.host_malloc import keep_freed_memory


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory=16 * 2**20, max_num_batched_tokens=64, show_progress=False)


def test_batch_1_decode_uses_the_compiled_gemv_with_torchs_threads(llm, monkeypatch):
    if not native_ops.available():
        pytest.skip("no C compiler: the GEMV could not be built")
    torch.set_num_threads(2)
    real = native_ops.gemv
    steps: list[tuple[int, int]] = []  # (rows, torch threads) per GEMV

    def spy(x, weight_t):
        steps.append((x.shape[0], torch.get_num_threads()))
        return real(x, weight_t)

    monkeypatch.setattr(native_ops, "gemv", spy)
    monkeypatch.setattr(host_blas, "matmul", lambda *args: pytest.fail("OpenBLAS used beside the GEMV"))
    llm.generate([{"prompt_token_ids": list(range(500, 520))}],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    layers = llm.engine.model_config.num_layers
    # The prefill's one LM-head row, then 3 decode steps x (4 matmuls per layer + the LM head): single rows, torch
    # keeping its 2 threads.
    assert steps == [(1, 2)] * (1 + 3 * (4 * layers + 1))


def test_gemv_matches_torch_within_rounding():
    if not native_ops.available():
        pytest.skip("no C compiler: the kernels could not be built")
    for num_in, num_out in ((64, 96), (7, 5), (1536, 576)):  # row counts that are and are not multiples of 4
        x, weight_t = torch.randn(1, num_in), torch.randn(num_in, num_out)
        torch.testing.assert_close(native_ops.gemv(x, weight_t), x @ weight_t, atol=1e-4, rtol=1e-5)


def test_rms_norm_matches_torch_within_rounding():
    if not native_ops.available():
        pytest.skip("no C compiler: the kernels could not be built")
    weight = torch.randn(576)
    for rows in (0, 1, 7, 300):  # 300 x 576 rows run on several threads
        x = torch.randn(rows, 576) * 3
        expected = torch.nn.functional.rms_norm(x, (576,), weight, 1e-5)
        torch.testing.assert_close(native_ops.rms_norm(x, weight, 1e-5), expected, atol=1e-5, rtol=1e-5)


def test_native_kernels_are_set_on_every_linear_and_norm(llm):
    from kvserve.layers.norm import RMSNorm

    modules = list(llm.engine.runner.model.modules())
    assert all(m.use_native_gemv for m in modules if isinstance(m, Linear))
    assert all(m.use_native for m in modules if isinstance(m, RMSNorm))


def test_without_the_gemv_small_steps_use_openblas_single_threaded_torch(monkeypatch):
    """Prefill (20 tokens) runs on torch; each decode step on OpenBLAS while torch has one thread."""
    llm = LLM(kv_cache_memory=16 * 2**20, max_num_batched_tokens=64, cpu_native_kernels=False, show_progress=False)
    torch.set_num_threads(2)
    real = host_blas.matmul
    steps: list[tuple[int, int]] = []  # (rows, torch threads) per OpenBLAS matmul

    def spy(x, weight_t):
        steps.append((x.shape[0], torch.get_num_threads()))
        return real(x, weight_t)

    monkeypatch.setattr(host_blas, "matmul", spy)
    llm.generate([{"prompt_token_ids": list(range(100, 120))}],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    layers = llm.engine.model_config.num_layers
    # 3 decode steps x (4 matmuls per layer + the LM head), each a single row with torch on one thread.
    assert steps == [(1, 1)] * (3 * (4 * layers + 1))
    assert torch.get_num_threads() == 2


def test_steps_of_several_rows_use_the_packed_weights(llm, monkeypatch):
    """Two 20-token prompts: one 40-token prefill step (2 rows reach the LM head), then two 2-row decode steps."""
    real = onednn.linear
    rows: list[int] = []

    def spy(x, packed, bias):
        rows.append(x.shape[0])
        return real(x, packed, bias)

    monkeypatch.setattr(onednn, "linear", spy)
    llm.generate([{"prompt_token_ids": list(range(300, 320))}, {"prompt_token_ids": list(range(400, 420))}],
                 SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    layers = llm.engine.model_config.num_layers
    assert sorted(rows) == sorted([40] * 4 * layers + [2] * (1 + 2 * (4 * layers + 1)))


def test_packed_copies_are_counted_in_model_memory(llm):
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert all(m.packed is not None for m in linears)
    plain = sum(m.weight_t.numel() * 4 for m in linears)
    assert llm.engine.runner.packed_weight_bytes == plain
    assert llm.stats().model_bytes > 2 * plain - llm.engine.runner.model.lm_head.weight_t.numel() * 4


def test_packed_linear_matches_the_plain_one_within_rounding():
    layer = Linear(64, 96, bias=True)
    torch.nn.init.normal_(layer.weight_t)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 64)
    plain = layer(x)
    layer.pack_for_onednn()
    torch.testing.assert_close(layer(x), plain)
    torch.testing.assert_close(layer(x[:1]), plain[:1])  # one row: the plain weight


def test_matmul_matches_torch_within_rounding():
    x, weight_t = torch.randn(5, 64), torch.randn(64, 96)
    torch.testing.assert_close(host_blas.matmul(x, weight_t), x @ weight_t)


def test_outside_a_step_nothing_takes_openblas():
    x = torch.randn(1, 8)
    assert not host_blas.takes(x)
    with host_blas.host_blas_step():
        assert host_blas.takes(x)
        assert not host_blas.takes(x.to(torch.bfloat16))
    assert not host_blas.takes(x)


def test_negative_cpu_blas_max_tokens_rejected():
    with pytest.raises(ValueError, match="cpu_blas_max_tokens must be >= 0, got -1"):
        LLM(cpu_blas_max_tokens=-1, show_progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_accepts_the_malloc_limits():
    assert keep_freed_memory()
