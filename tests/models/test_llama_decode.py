"""The compiled decode step (models/llama_decode.py) against the module path it replaces: the same hidden states
at every decode step, batched or not, whole in C or split around the modules' matmuls, on GGUF blocks and on float32
weights, and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams, native
from kvserve.kv import kv_quant
from kvserve.layers.quantization.gguf import DEQUANTIZED_GEMM_ROWS
from kvserve.models.llama_decode import FLOAT32_MAX_TOKENS, FusedLlamaDecode
from kvserve.platforms.cpu import CpuPlatform

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "请用中文介绍一下长城。",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _llm(**options) -> LLM:
    llm = LLM(kv_cache_memory=32 * 2**20, show_progress=False, **options)
    if not isinstance(llm.engine.runner.model.fused_decode, FusedLlamaDecode):
        llm.engine.shutdown()
        pytest.skip("the compiled decode step does not run here (no C compiler)")
    return llm


@pytest.fixture(scope="module")
def gguf() -> LLM:
    return _llm()


def _compare_every_step(llm: LLM, prompts: list[str], tolerance: float = 1e-5, outliers: float = 0.0) -> list[int]:
    """Generate, running each decode step both ways; returns the batch sizes the fused step ran with. Values
    may differ by `tolerance` times the largest, a fraction `outliers` of them by more.
    (Compared after the run: the engine turns an exception inside a step into failed requests.)"""
    model = llm.engine.runner.model
    fused, forward = model.fused_decode, type(model).forward
    batches, pairs = [], []

    def both(self, input_ids, positions, kv_caches, metadata):
        hidden = forward(self, input_ids, positions, kv_caches, metadata)
        ran = fused.forward(self, input_ids, positions, metadata) is not None
        self.fused_decode = None  # the module path (its K/V rows overwrite the fused ones with the same values)
        try:
            reference = forward(self, input_ids, positions, kv_caches, metadata)
        finally:
            self.fused_decode = fused
        if ran:
            batches.append(input_ids.shape[0])
            pairs.append((hidden, reference))
        return hidden

    model.forward = both.__get__(model)
    try:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        del model.forward
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outputs)
    for hidden, reference in pairs:
        # Float rounding only (SiLU's exp differs from torch's by an ulp): ~2e-5 on values up to ~50.
        beyond = (hidden - reference).abs() > tolerance * reference.abs().max()
        assert hidden.isfinite().all() and beyond.float().mean().item() <= outliers, \
            f"{beyond.sum().item()} of {beyond.numel()} values differ by more than {tolerance:g} of the largest"
    return batches


def _compare_split_steps(llm: LLM, prompts: list[str], **bounds) -> tuple[list[int], list[int]]:
    """_compare_every_step's batch sizes, and the sizes of the steps among them that ran split."""
    fused = llm.engine.runner.model.fused_decode
    split, split_layers = [], fused._split_layers

    def counted(model, hidden, step):
        split.append(hidden.shape[0])
        return split_layers(model, hidden, step)

    fused._split_layers = counted
    try:
        return _compare_every_step(llm, prompts, **bounds), split
    finally:
        del fused._split_layers


def test_gguf_decode_steps_match_the_modules(gguf: LLM) -> None:
    batches = _compare_every_step(gguf, PROMPTS) + _compare_every_step(gguf, PROMPTS[:1])
    assert 4 in batches and 1 in batches  # batched and single decodes both ran fused


def test_gguf_batches_from_the_blas_threshold_run_split(gguf: LLM) -> None:
    """From DEQUANTIZED_GEMM_ROWS decodes the modules' dequantize + BLAS matmuls are faster (64 decodes: 128 -> 152
    tokens/s offline): the step runs split, those matmuls between the C parts. Here the threshold is lowered so that
    four prompts cross it and one does not."""
    fused = gguf.engine.runner.model.fused_decode
    assert fused.max_tokens == DEQUANTIZED_GEMM_ROWS - 1
    fused.max_tokens = 3
    try:
        batches, split = _compare_split_steps(gguf, PROMPTS)
        assert 4 in batches and set(split) == {4}  # every step of four decodes ran split, and matched
        assert _compare_split_steps(gguf, PROMPTS[:1]) == ([1] * (GREEDY.max_tokens - 1), [])
    finally:
        fused.max_tokens = DEQUANTIZED_GEMM_ROWS - 1


# The quantized caches the fused step writes itself: int8 (a code and scale per token row), and KIVI int4 in blocks
# of 16, whose rows go to the request's residual slot and whose completed blocks it quantizes (quantize_block_int4).
QUANTIZED_CACHES = {"int8": {"kv_cache_dtype": "int8"},
                    "int4": {"kv_cache_dtype": "int4", "kv_residual_tokens": 16, "max_num_seqs": 4}}


@pytest.mark.parametrize("cache", QUANTIZED_CACHES)
def test_quantized_cache_decode_steps_match_the_modules(cache: str) -> None:
    """An ulp of difference in a K/V value can move its code by one step (int8: ~1% of the row's absmax), so the
    bound is looser than float32's (int8's worst step measured 0.9e-3 and, with attention summed in 128-token spans,
    1.4e-3 of the largest value); a wrong scale or row is off by O(1). Whole and split."""
    llm = _llm(**QUANTIZED_CACHES[cache])
    fused = llm.engine.runner.model.fused_decode
    try:
        assert 4 in _compare_every_step(llm, PROMPTS, tolerance=3e-3)
        fused.max_tokens = 3
        assert set(_compare_split_steps(llm, PROMPTS, tolerance=3e-3)[1]) == {4}
    finally:
        llm.engine.shutdown()


def test_int8_cache_rows_are_quantized_as_the_modules_do() -> None:
    """The fused step writes each decode token's K/V codes and scales itself, bit for bit as kv_quant does:
    ties (x / scale at .5: half to even), values past the clamp, rows of zeros."""
    kernels = native.load("llama_decode")
    if kernels is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 64, generator=gen) * torch.logspace(-3, 2, 64).unsqueeze(1)
    rows[1] = 0.0
    rows[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5])  # absmax 127: scale 1, ties
    codes, scales = torch.empty(64, 64, dtype=torch.int8), torch.empty(64)
    kernels.quantize_rows_i8(rows.data_ptr(), codes.data_ptr(), scales.data_ptr(), 64, 64)
    expected_codes, expected_scales = kv_quant.quantize(rows, "int8")
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales.squeeze(1))


def test_int4_blocks_are_quantized_as_the_modules_do() -> None:
    """The fused step's int4 blocks, bit for bit kv_quant.quantize_int4's: keys per channel over the block's tokens,
    values per token; ties of (x - zero) / scale at .5 (half to even), constant ranges (scale 1), a row of zeros."""
    kernels = native.load("llama_decode")
    if kernels is None:
        pytest.skip("no C compiler")
    block_size, heads, dim = 16, 3, 64
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(block_size, heads, dim, generator=gen) * torch.logspace(-3, 2, dim)
    rows[:, 0, 0] = 1.0  # a constant channel
    rows[3] = 0.0  # a token of zeros
    rows[:, 1, 5] = torch.arange(block_size) * 0.5  # range 7.5: scale 0.5, every code exact
    # range 0 .. 15: scale 1, zero 0, so x / scale ties at .5: 2.5 -> 2, 6.5 -> 6 (half to even, not away from 0)
    rows[:, 1, 6] = torch.tensor([0.0, 15.0, 2.5, 6.5, 4.5, 9.5, *([7.5] * (block_size - 6))])
    for per_channel, dim_of_range in ((1, 0), (0, -1)):
        codes = torch.zeros(block_size, heads, dim // 2, dtype=torch.uint8)
        shape = (1, heads, dim) if per_channel else (block_size, heads, 1)
        scale, zero = torch.empty(shape, dtype=torch.float16), torch.empty(shape, dtype=torch.float16)
        kernels.quantize_block_int4(rows.data_ptr(), codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), per_channel,
                                    block_size, heads, dim)
        expected = kv_quant.quantize_int4(rows, dim_of_range)
        assert torch.equal(codes, expected[0]), per_channel
        assert torch.equal(scale, expected[1]) and torch.equal(zero, expected[2]), per_channel


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
def test_16bit_cache_decode_steps_match_the_modules(kv_cache_dtype: str) -> None:
    """A float32 model's float16 / bfloat16 cache: the fused step rounds its K/V rows as torch does and widens
    them as read; an ulp of difference before rounding moves a value by one 16-bit ulp at most (a wrong rounding or
    element size is off far more)."""
    llm = _llm(kv_cache_dtype=kv_cache_dtype)
    fused = llm.engine.runner.model.fused_decode
    try:
        assert llm.engine.runner.kv_caches[0].key.dtype == getattr(torch, kv_cache_dtype)
        assert 4 in _compare_every_step(llm, PROMPTS, tolerance=1e-3)
        fused.max_tokens = 3
        assert set(_compare_split_steps(llm, PROMPTS, tolerance=1e-3)[1]) == {4}
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_cache_rows_are_rounded_as_torch_does(dtype: torch.dtype) -> None:
    """The fused step's float16 / bfloat16 K/V rows, bit for bit torch's .to(dtype): ties to even, overflow, NaN,
    infinities, subnormals."""
    kernels = native.load("llama_decode")
    if kernels is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4099, generator=gen) * torch.logspace(-42, 38, 4099).clamp(max=3e38)
    special = [float("nan"), float("inf"), -float("inf"), 65520.0, 65519.0, 1e-8, -0.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11,
               1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-40]  # ties of float16 and bfloat16 just past 1.0, both ways
    rows[:len(special)] = torch.tensor(special)
    out = torch.empty(rows.shape, dtype=torch.int16)
    kernels.round_to_16bit(rows.data_ptr(), out.data_ptr(), rows.numel(), int(dtype == torch.bfloat16))
    expected = rows.to(dtype).view(torch.int16)
    nan = rows.isnan()
    assert torch.equal(out[~nan], expected[~nan]) and out[nan].view(dtype).isnan().all()


@pytest.mark.parametrize("cache", QUANTIZED_CACHES)
def test_quantized_cache_greedy_tokens_equal_the_module_paths(cache: str) -> None:
    fused = _llm(**QUANTIZED_CACHES[cache])
    modules = LLM(kv_cache_memory=32 * 2**20, cpu_fused_decode=False, show_progress=False, **QUANTIZED_CACHES[cache])
    try:
        ids = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
               for llm in (fused, modules)]
        assert ids[0] == ids[1]
    finally:
        fused.engine.shutdown(), modules.engine.shutdown()


def test_float32_decode_steps_match_the_modules_whole_and_split() -> None:
    llm = _llm(quantization="none")
    fused = llm.engine.runner.model.fused_decode
    try:
        assert fused.max_tokens == FLOAT32_MAX_TOKENS
        assert _compare_every_step(llm, PROMPTS[:1]).count(1) == GREEDY.max_tokens - 1
        batches, split = _compare_split_steps(llm, PROMPTS)  # four decodes, past the limit: oneDNN's matmuls
        assert 4 in batches and set(split) == {4}
        fused.max_tokens = 4  # the kernels' own float32 rows, batched
        batches, split = _compare_split_steps(llm, PROMPTS)
        assert 4 in batches and split == []
    finally:
        llm.engine.shutdown()


def test_greedy_tokens_equal_the_module_paths(gguf: LLM) -> None:
    modules = LLM(kv_cache_memory=32 * 2**20, cpu_fused_decode=False, show_progress=False)
    try:
        assert modules.engine.runner.model.fused_decode is None
        ids = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
               for llm in (gguf, modules)]
        assert ids[0] == ids[1]
    finally:
        modules.engine.shutdown()


def test_steps_it_cannot_run_go_to_the_modules() -> None:
    # An fp8 KV cache: the kernel reads float32, 16-bit and int8 caches only.
    llm = LLM(kv_cache_memory=32 * 2**20, kv_cache_dtype="fp8", show_progress=False)
    try:
        assert llm.engine.runner.model.fused_decode is None
        assert isinstance(llm.engine.platform, CpuPlatform)
    finally:
        llm.engine.shutdown()


def test_an_int8_cache_with_8bit_activations_rounds_the_queries_on_both_paths() -> None:
    """cpu_gguf_int8_activations with an int8 cache: the attention backend (the module path's decodes, in mixed
    steps) and the fused step both take Q.K on 8-bit queries, so a request's tokens do not depend on which ran."""
    llm = _llm(cpu_gguf_int8_activations=True, kv_cache_dtype="int8")
    try:
        runner = llm.engine.runner
        assert runner.attention_backend.int8_queries and runner.model.fused_decode.shape.int8_queries == 1
        assert 4 in _compare_every_step(llm, PROMPTS, tolerance=1e-2, outliers=1e-2)
    finally:
        llm.engine.shutdown()


def test_gguf_decode_steps_with_8bit_activations_match_the_modules() -> None:
    """cpu_gguf_int8_activations: both paths read the interleaved Q4_1 tiles with the same kernels. Looser: where
    the paths' float inputs differ by an ulp an 8-bit code can flip, and 30 layers carry it on (measured: most
    values within 5e-3 of the largest, a few in a thousand up to 4e-2; a wrong kernel is off everywhere)."""
    llm = _llm(cpu_gguf_int8_activations=True)
    try:
        model = llm.engine.runner.model
        assert all(run.interleaved for run in model.model.layers[0].mlp.down_proj.weight.segments)
        batches = _compare_every_step(llm, PROMPTS, tolerance=1e-2, outliers=1e-2)
        assert 4 in batches
    finally:
        llm.engine.shutdown()
