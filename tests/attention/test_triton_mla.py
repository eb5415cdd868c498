"""Triton MLA kernels (attention/triton_mla.py) against the torch path (attention/mla.py) they replace.

Under Triton's interpreter without a GPU (TRITON_INTERPRET=1, set here before triton is imported), as
test_triton_attention.py explains; compiled on a CUDA machine.
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

from paged_cases import clone_cache  # noqa: E402

from kvserve.attention import mla, triton_mla  # noqa: E402
from kvserve.attention import triton_attention as ta  # noqa: E402
from kvserve.attention.backend import AttentionRequirements  # noqa: E402
from kvserve.attention.selector import create_attention_backend  # noqa: E402
from kvserve.attention.torch_metadata import build_torch_metadata  # noqa: E402
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches  # noqa: E402
from kvserve.kv.kv_spec import KVCacheSpec  # noqa: E402
from kvserve.runner.attention_inputs import build_common_metadata  # noqa: E402

if not ta.IS_INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton_attention was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)
DEVICE = "cpu" if ta.IS_INTERPRETED else "cuda"
TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32


def latent_cache(seq_lens: list[int], width: int, kv_cache_dtype: str, block_size: int = 16,
                 seed: int = 0) -> tuple[LayerKVCache, list[list[int]]]:
    """A latent cache holding `seq_lens` tokens of random latents per request, in shuffled physical blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks) + 2
    storage = "float32" if kv_cache_dtype == "auto" else kv_cache_dtype
    cache = allocate_kv_caches([KVCacheSpec(1, width, 0, storage)], num_blocks, block_size, DEVICE)[0]
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [physical[sum(blocks[:i]):sum(blocks[:i + 1])] for i in range(len(seq_lens))]
    slots = [table[pos // block_size] * block_size + pos % block_size
             for table, length in zip(tables, seq_lens, strict=True) for pos in range(length)]
    latents = torch.randn(len(slots), width, generator=gen) * (0.5 + 2 * torch.rand(len(slots), 1, generator=gen))
    mla.write_latent(latents.to(DEVICE), cache, torch.tensor(slots, device=DEVICE))
    return cache, tables


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_write_latent_is_bit_exact_and_skips_negative_slots(kv_cache_dtype: str) -> None:
    cache, _ = latent_cache([20, 7], 40, kv_cache_dtype)
    expected = clone_cache(cache)
    latents = torch.randn(5, 40, device=DEVICE) * 3
    slots = torch.tensor([3, -1, 17, 40, -1], device=DEVICE)
    triton_mla.write_latent(latents, cache, slots)
    kept = slots >= 0
    mla.write_latent(latents[kept], expected, slots[kept])
    assert torch.equal(cache.key, expected.key)
    if expected.key_scale is not None:
        assert torch.equal(cache.key_scale, expected.key_scale)


# (num_heads, d_c, d_r): a tiny model's, DeepSeek-V2-Lite's (16 heads of 512 + 64), heads not a multiple of 16.
SHAPES = [(4, 32, 8), (16, 512, 64), (20, 64, 16)]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
@pytest.mark.parametrize(("num_heads", "latent", "rope"), SHAPES)
def test_absorbed_decode_matches_torch(num_heads: int, latent: int, rope: int, kv_cache_dtype: str) -> None:
    seq_lens = [1, 37, 600, 1100]  # one key; a partial block; two and three split-KV partitions
    cache, tables = latent_cache(seq_lens, latent + rope, kv_cache_dtype)
    common = build_common_metadata([f"r{i}" for i in range(len(seq_lens))], [n - 1 for n in seq_lens],
                                   [1] * len(seq_lens), tables, 16, torch.device(DEVICE))
    query = torch.randn(len(seq_lens), num_heads, latent + rope, generator=torch.Generator().manual_seed(1))
    query = query.to(DEVICE)
    scale = (latent + rope) ** -0.5
    expected = mla.absorbed_decode(query, cache, build_torch_metadata(common), latent, scale)
    storage = "float32" if kv_cache_dtype == "auto" else kv_cache_dtype
    backend = create_attention_backend("triton", AttentionRequirements(torch.device(DEVICE), storage,
                                                                       use_window=False, use_mla=True))
    out = backend.absorbed_decode(query, cache, backend.build_metadata(common), latent, scale)
    torch.testing.assert_close(out, expected, **TOL)


def test_absorbed_decode_with_the_partitions_capped_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three partitions' worth of keys under a cap of one partition: one program walks the whole table."""
    monkeypatch.setattr(ta, "MAX_PARTITIONS", 1)
    seq_lens = [1100, 37]
    cache, tables = latent_cache(seq_lens, 32 + 8, "int8")
    common = build_common_metadata(["a", "b"], [n - 1 for n in seq_lens], [1, 1], tables, 16, torch.device(DEVICE))
    query = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    expected = mla.absorbed_decode(query, cache, build_torch_metadata(common), 32, 40**-0.5)
    out = triton_mla.absorbed_decode(query, cache, common.block_table, common.seq_lens, 32, 40**-0.5)
    torch.testing.assert_close(out, expected, **TOL)


def test_tiny_deepseek_greedy_tokens_match_torch_backend(tmp_path: Any, word_tokenizer: Any) -> None:
    """Decodes on the latent kernels, prompts chunked over a cached prefix (prefill_latents), int8 latents too."""
    import transformers

    from kvserve import LLM, SamplingParams

    config = transformers.DeepseekV3Config(
        vocab_size=len(word_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, first_k_dense_replace=2, n_group=1, topk_group=1,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.15)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    prompts = [{"prompt_token_ids": [5, 42, 7]}, {"prompt_token_ids": list(range(300, 340))}]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for kv_cache_dtype in ("auto", "int8"):
        tokens = {}
        for backend in ("torch", "triton"):
            llm = LLM(model=str(tmp_path), device=DEVICE, attention_backend=backend, kv_cache_dtype=kv_cache_dtype,
                      kv_cache_memory=2**20, max_num_batched_tokens=16, show_progress=False)
            tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert tokens["triton"] == tokens["torch"], kv_cache_dtype
