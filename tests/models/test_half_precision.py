"""bfloat16 and float16 end to end (the CUDA dtypes, run here on the CPU's torch path): weights, activations and KV
cache in the model dtype; float32 where it matters (RMSNorm's mean of squares, logits for sampling)."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.layers.norm import rms_norm

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def float32_tokens() -> list[list[int]]:
    llm = LLM(show_progress=False, quantization="none")
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_keeps_float32_where_it_matters(dtype: torch.dtype, float32_tokens: list[list[int]]) -> None:
    llm = LLM(show_progress=False, dtype=str(dtype).removeprefix("torch."))
    runner = llm.engine.runner
    assert runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == dtype
    assert runner.kv_caches[0].key.dtype == dtype
    hidden = torch.randn(3, runner.model.config.hidden_size).to(dtype)
    assert runner.model.compute_logits(hidden).dtype == torch.float32  # sampled in float32
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    # The bundled model's greedy continuations of these prompts have no near-ties in 16 tokens.
    assert tokens == float32_tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_of_half_inputs_accumulates_in_float32(dtype: torch.dtype) -> None:
    # 300 squared is past float16's range (65504): squares taken in half precision would be inf.
    x = torch.full((2, 576), 300.0).to(dtype)
    weight = torch.ones(576, dtype=dtype)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and torch.equal(out, torch.ones_like(out))
