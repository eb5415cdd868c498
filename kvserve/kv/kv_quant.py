"""KV-cache quantization: symmetric int8 and fp8 (e4m3), one float32 scale per token per KV head."""

from __future__ import annotations

import torch

# Storage dtype and the largest magnitude it holds, per kv_cache_dtype. fp8 e4m3 codes are kept
# as their raw bytes (uint8): CPU index_copy_/gather are not implemented for float8 tensors.
QUANTIZED_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.uint8, 448.0),
}


def quantize(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D] in the storage dtype, scale [..., 1] float32), x ≈ codes * scale."""
    _, qmax = QUANTIZED_DTYPES[kv_cache_dtype]
    x = x.float()
    # Per-vector absmax scaling: an outlier token only costs its own precision.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
    scaled = x / scale
    if kv_cache_dtype == "int8":
        return scaled.round_().clamp_(-qmax, qmax).to(torch.int8), scale
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D], scale [..., 1] -> values [..., D] in `dtype`."""
    if codes.dtype == torch.uint8:
        codes = codes.view(torch.float8_e4m3fn)
    return codes.to(dtype) * scale.to(dtype)
