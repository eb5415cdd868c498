"""The KV dtype table, the cache spec's bytes per token and the allocated tensors agree for every dtype."""

from fractions import Fraction

import pytest

from kvserve.kv.dtypes import (
    DEFAULT_INT4_GROUP_SIZE,
    KV_CACHE_DTYPES,
    KV_DTYPES,
    MODEL_DTYPES,
    STORAGE_DTYPES,
    kv_dtype,
    torch_dtype,
)
from kvserve.kv.kv_cache import allocate_kv_caches
from kvserve.kv.kv_spec import KVCacheSpec, bytes_per_token, num_blocks_for_budget


def test_spec_bytes_and_budget():
    spec = KVCacheSpec(num_kv_heads=3, key_dim=64, value_dim=64, dtype="float32")
    assert spec.elements_per_token == 384 and spec.bytes_per_token == 1536
    specs = [spec] * 30
    assert bytes_per_token(specs) == 46080
    assert num_blocks_for_budget(specs, 16, 46080 * 16 * 10 + 5) == 10
    with pytest.raises(ValueError, match="KV cache dtype must be one of"):
        KVCacheSpec(1, 1, 1, "float64")


def test_table_names_the_option_values_and_the_storage_dtypes():
    assert KV_CACHE_DTYPES == ("auto", "float32", "float16", "bfloat16", "int8", "int4", "fp8")
    assert set(MODEL_DTYPES) == {"float32", "float16", "bfloat16"}
    assert set(STORAGE_DTYPES) == set(KV_DTYPES) - {"auto"}
    assert [name for name in KV_DTYPES if kv_dtype(name).is_quantized] == ["int8", "int4", "fp8"]
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        kv_dtype("int2")


@pytest.mark.parametrize("name", STORAGE_DTYPES)
@pytest.mark.parametrize("value_dim", [64, 0], ids=["kv", "mla"])
def test_allocated_bytes_match_the_table(name: str, value_dim: int):
    # Bytes per token from the table (int4 key scales amortised over one block) times the cached tokens must be
    # exactly what the allocator holds, residual slots aside.
    if name == "int4" and not value_dim:
        pytest.skip("int4 is not supported for MLA: the engine refuses it before allocating")
    block_size, num_blocks = DEFAULT_INT4_GROUP_SIZE, 3
    spec = KVCacheSpec(num_kv_heads=2, key_dim=64, value_dim=value_dim, dtype=name,
                       group_size=block_size if name == "int4" else 0)
    (cache,) = allocate_kv_caches([spec], num_blocks, block_size, "cpu")
    residual = sum(t.numel() * t.element_size() for t in (cache.residual_key, cache.residual_value) if t is not None)
    assert cache.num_bytes - residual == spec.bytes_per_token * block_size * num_blocks
    assert cache.key.dtype == torch_dtype(kv_dtype(name).storage_dtype)
    if kv_dtype(name).is_quantized:
        assert cache.key_scale.dtype == torch_dtype(kv_dtype(name).param_dtype)


def test_int4_key_scales_are_amortised_over_the_group():
    spec = KVCacheSpec(num_kv_heads=1, key_dim=64, value_dim=64, dtype="int4", group_size=32)
    # 0.5 byte per element; values: scale + zero point (2 bytes each) per token; keys: per channel per 32 tokens.
    assert spec.bytes_per_token == 64 + 2 * 2 + Fraction(64 * 2 * 2, 32)
    with pytest.raises(ValueError, match="group_size >= 1"):
        _ = KVCacheSpec(1, 64, 64, "int4").bytes_per_token
