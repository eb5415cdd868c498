"""Fused Triton kernels (layers/triton_fused.py) against the torch references they replace.

Without a GPU they run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before triton is
imported), as tests/attention/test_triton_attention.py explains.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvserve.layers import triton_fused as tf  # noqa: E402
from kvserve.layers.activation import silu_and_mul  # noqa: E402
from kvserve.layers.norm import rms_norm  # noqa: E402
from kvserve.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402
from kvserve.platforms.base import Platform  # noqa: E402

IS_INTERPRETED = not isinstance(tf._rms_norm_kernel, tf.triton.runtime.JITFunction)
if not IS_INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton_fused was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)
DEVICE = "cpu" if IS_INTERPRETED else "cuda"
# float32: the reference's math up to summation order; bfloat16: within one rounding of the reference.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (7, 100), (33, 1024), (3, 1)])
def test_rms_norm_matches_torch(dtype: torch.dtype, rows: int, dim: int) -> None:
    x, weight = randn(rows, dim, dtype=dtype) * 3, randn(dim, dtype=dtype, seed=1)
    torch.testing.assert_close(tf.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), **TOL[dtype])


def test_rms_norm_reads_strided_rows_and_keeps_leading_dims() -> None:
    wide, weight = randn(5, 2, 96), randn(64, seed=1)
    x = wide[..., :64]  # rows 96 apart: read in place
    out = tf.rms_norm(x, weight, 1e-6)
    assert out.shape == (5, 2, 64)
    torch.testing.assert_close(out, rms_norm(x, weight, 1e-6), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_the_sum_and_its_norm(dtype: torch.dtype) -> None:
    x, residual, weight = randn(9, 576, dtype=dtype), randn(9, 576, dtype=dtype, seed=2), randn(576, dtype=dtype)
    normed, summed = tf.add_rms_norm(x, residual, weight, 1e-5)
    if IS_INTERPRETED and dtype != torch.float32:  # the interpreter's float32 -> bfloat16 cast truncates
        torch.testing.assert_close(summed, x + residual, rtol=2**-7, atol=0)
    else:
        assert torch.equal(summed, x + residual)  # rounded once in the model dtype, as torch adds
    torch.testing.assert_close(normed, rms_norm(x + residual, weight, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "size"), [(1, 1536), (6, 37), (17, 3072)])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, rows: int, size: int) -> None:
    gate_up = randn(rows, 2 * size, dtype=dtype) * 4
    torch.testing.assert_close(tf.silu_and_mul(gate_up), silu_and_mul(gate_up), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 1, 128), (2, 2, 32)])
def test_rotary_rotates_q_and_k_in_place_like_torch(dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                                                    head_dim: int) -> None:
    num_tokens = 11
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 3, 50, 51, 700, 701, 702, 4000, 4095], device=DEVICE)
    cos_sin = rotary.lookup(positions, dtype)
    # Q and K side by side in a fused QKV output, V after them: the kernel rotates the view in place.
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    qk = qkv[:, :(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_heads + num_kv_heads, head_dim)
    expected, v_before = apply_rotary(qk, cos_sin), qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    out = tf.apply_rotary(qk, cos_sin)
    assert out.data_ptr() == qk.data_ptr()
    torch.testing.assert_close(qk, expected, **TOL[dtype])
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # V untouched


def test_rotary_refuses_a_strided_head_dimension() -> None:
    x = randn(2, 3, 128)[..., ::2]
    with pytest.raises(ValueError, match="head dimension must be contiguous"):
        tf.apply_rotary(x, (x, x))


def use_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the CPU platform what the CUDA platform uses: the Triton norm, add + norm, SiLU and RoPE kernels."""
    monkeypatch.setattr(Platform, "norm_kernel", lambda self, dtype: tf.rms_norm)
    monkeypatch.setattr(Platform, "add_norm_kernel", lambda self, dtype: tf.add_rms_norm)
    monkeypatch.setattr(Platform, "fused_kernels", lambda self, dtype: tf.REPLACEMENTS)


def test_tiny_llama_greedy_tokens_match_with_fused_kernels(tmp_path: Any, word_tokenizer: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from kvserve import LLM, SamplingParams

    config = transformers.LlamaConfig(vocab_size=len(word_tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.15)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    prompts = [{"prompt_token_ids": [1, 520, 3000, 45, 8800, 17]}, {"prompt_token_ids": list(range(300, 340))}]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    options = {"model": str(tmp_path), "device": DEVICE, "attention_backend": "torch", "show_progress": False,
               "kv_cache_memory": 2**20, "max_num_batched_tokens": 16, "cpu_native_kernels": False}
    plain = [o.outputs[0].token_ids for o in LLM(**options).generate(prompts, params, use_tqdm=False)]
    use_fused_kernels(monkeypatch)
    llm = LLM(**options)
    layer = llm.engine.runner.model.model.layers[0]
    assert layer.mlp.activation is tf.silu_and_mul and layer.self_attn.rotary_kernel is tf.apply_rotary
    assert layer.post_attention_layernorm.add_kernel is tf.add_rms_norm
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == plain
