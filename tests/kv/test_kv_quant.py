"""Round-trip error of each KV quantization scheme on random data with outliers."""

import pytest
import torch

from kvserve.kv.kv_quant import dequantize, quantize
from kvserve.kv.kv_spec import KVCacheSpec


def keys_with_outliers(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, 128, generator=generator)  # [tokens, heads, dim]
    x[:, :, 7] *= 30  # an outlier channel, as real keys have
    x[5, 2] *= 100  # and one extreme token
    return x


@pytest.mark.parametrize(("kv_cache_dtype", "bound"), [("int8", 0.5 / 127), ("fp8", 2.0 ** -4)])
def test_round_trip_error_is_bounded_per_vector(kv_cache_dtype, bound):
    x = keys_with_outliers()
    codes, scale = quantize(x, kv_cache_dtype)
    assert codes.element_size() == 1 and scale.shape == (64, 4, 1)
    restored = dequantize(codes, scale, torch.float32)
    # Error relative to each vector's absmax: the outlier token cannot hurt the others.
    absmax = x.abs().amax(dim=-1, keepdim=True)
    assert ((restored - x).abs() / absmax).max() <= bound + 1e-6
    relative = (restored - x).norm() / x.norm()
    # int8 steps are uniform, so an outlier channel coarsens the rest; fp8 keeps relative precision.
    assert relative < {"int8": 0.03, "fp8": 0.01}[kv_cache_dtype]


def test_zero_vectors_stay_zero_and_finite():
    codes, scale = quantize(torch.zeros(3, 2, 8), "int8")
    assert torch.equal(dequantize(codes, scale, torch.float32), torch.zeros(3, 2, 8))


def test_quantized_spec_counts_scales():
    spec = KVCacheSpec(num_kv_heads=3, key_dim=64, value_dim=64, dtype="int8")
    assert spec.bytes_per_token == 3 * 128 + 3 * 2 * 4  # codes + a float32 scale per head for K and V
    assert KVCacheSpec(3, 64, 64, "fp8").bytes_per_token == spec.bytes_per_token
