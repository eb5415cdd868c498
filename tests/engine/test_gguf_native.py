"""The bundled model runs on its GGUF blocks by default: the file's bytes in memory, the dequantized model's
greedy tokens, and `quantization` choosing between the two."""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader

from kvserve import LLM, SamplingParams
from kvserve.config import EngineConfig
from kvserve.layers import gguf_ops
from kvserve.layers.quantization.gguf import GgufLinearMethod
from kvserve.loader.weights import resolve_model_path
from kvserve.platforms import get_platform

pytestmark = pytest.mark.skipif(not gguf_ops.available(), reason="no C compiler: the GGUF kernels cannot build")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "请用中文介绍一下长城。",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def native() -> LLM:
    return LLM(kv_cache_memory=32 * 2**20, show_progress=False)


def _token_ids(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_bundled_model_defaults_to_its_gguf_blocks_and_holds_only_the_files_bytes(native: LLM) -> None:
    runner = native.engine.runner
    assert runner.quantization == "gguf"
    assert all(type(layer.method) is GgufLinearMethod for layer in runner.model.modules() if hasattr(layer, "method"))
    file_tensor_bytes = sum(int(t.n_bytes) for t in GGUFReader(resolve_model_path(None)).tensors)
    # The GGUF tensors (66 MB of Q4_1 layers, a 30 MB Q8_0 embedding that is also the LM head, F32 norms) plus
    # the rotary tables: no float32 copy, no packed copy.
    assert file_tensor_bytes <= native.stats().model_bytes < file_tensor_bytes + 2**20


def test_greedy_tokens_equal_the_dequantized_models(native: LLM) -> None:
    # The kernels compute with the dequantized values (float32 activations): the same model up to summation order.
    dequantized = LLM(quantization="none", kv_cache_memory=32 * 2**20, show_progress=False)
    try:
        assert dequantized.engine.runner.quantization is None
        assert dequantized.stats().model_bytes > 500e6
        assert _token_ids(native) == _token_ids(dequantized)
    finally:
        dequantized.engine.shutdown()


def test_quantization_option_is_checked() -> None:
    with pytest.raises(ValueError,
                       match=r"quantization must be one of \['none', 'gguf', 'int8', 'int4', 'awq'\], got 'int3'"):
        LLM(quantization="int3", show_progress=False)
    platform = get_platform(EngineConfig())
    with pytest.raises(ValueError, match="quantization='gguf' needs a .gguf model file"):
        platform.resolve_quantization("gguf", object(), torch.float32)  # a safetensors source
    assert platform.resolve_quantization(None, object(), torch.float32) is None


def test_without_the_compiled_kernels_the_file_is_dequantized() -> None:
    llm = LLM(cpu_native_kernels=False, kv_cache_memory=16 * 2**20, show_progress=False)
    try:
        assert llm.engine.runner.quantization is None
    finally:
        llm.engine.shutdown()


def _assert_leaves_only_at_near_ties(exact: LLM, rounded: LLM) -> None:
    """Where `rounded`'s greedy text first leaves `exact`'s on PROMPTS, its token was in exact's top 5 there,
    within 0.5 nats of exact's choice (a wrong kernel leaves at a confident token)."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    pairs = zip(exact.generate(PROMPTS, params, use_tqdm=False), rounded.generate(PROMPTS, params, use_tqdm=False),
                strict=True)
    for exact_output, rounded_output in pairs:
        exact_ids, rounded_ids = exact_output.outputs[0].token_ids, rounded_output.outputs[0].token_ids
        first = next((i for i, (a, b) in enumerate(zip(exact_ids, rounded_ids, strict=True)) if a != b), None)
        if first is None:
            continue
        # Same context up to `first`: the exact model's view of the token the rounded path chose there.
        ranked = exact_output.outputs[0].logprobs[first]
        assert rounded_ids[first] in ranked, "the rounded path chose a token outside the exact model's top 5"
        assert ranked[exact_ids[first]] - ranked[rounded_ids[first]] < 0.5


def test_int8_activations_leave_the_greedy_path_only_at_near_ties(native: LLM) -> None:
    # cpu_gguf_int8_activations rounds activations to 8 bits (llama.cpp's arithmetic): lossy, so the greedy text
    # may leave the float path's, but only where the float model itself nearly tied. Measured first differing
    # token on these prompts: 23, 0, 7 and never (of 32), each time at a float top-2 gap under 0.3 nats.
    int8 = LLM(kv_cache_memory=32 * 2**20, cpu_gguf_int8_activations=True, show_progress=False)
    try:
        _assert_leaves_only_at_near_ties(native, int8)
    finally:
        int8.engine.shutdown()


def test_int8_activations_and_queries_on_an_int8_cache_leave_only_at_near_ties() -> None:
    # With an int8 cache the 8-bit path also rounds the decode queries for Q.K (llama.cpp's q8_0 K cache): against
    # float activations and queries on the same int8 cache, the text leaves only at near ties as well. Measured
    # first differing token: 5, 0, 8 and never, at top-2 gaps of 0.13, 0.04 and 0.23 nats (rounding the queries
    # alone, against 8-bit activations with float queries: 5, never, 7, never; gaps 0.02 and 0.3).
    exact, rounded = (LLM(kv_cache_memory=32 * 2**20, kv_cache_dtype="int8", cpu_gguf_int8_activations=int8,
                          show_progress=False) for int8 in (False, True))
    try:
        assert rounded.engine.runner.attention_backend.int8_queries
        _assert_leaves_only_at_near_ties(exact, rounded)
    finally:
        exact.engine.shutdown()
        rounded.engine.shutdown()
