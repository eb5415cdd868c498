"""KV-cache quantization: symmetric int8 and fp8 (e4m3) per token, and KIVI-style asymmetric int4.

int8 / fp8: one float32 scale per token per KV head.
int4 (KIVI): keys per channel over a group of tokens (key outliers live in a few channels, so a
per-channel range keeps the other channels fine), values per token; both asymmetric (scale and zero
point, float16), two 4-bit codes packed per byte.
"""

from __future__ import annotations

import torch

from kvserve.kv.dtypes import KV_DTYPES, torch_dtype

# The largest magnitude each symmetric dtype's codes hold (int8 127, fp8 e4m3 448), from the KV dtype table.
_MAX_CODE = {name: d.max_code for name, d in KV_DTYPES.items() if d.max_code}
INT4_LEVELS = 15  # codes 0..15
INT4_PARAM_DTYPE = torch_dtype(KV_DTYPES["int4"].param_dtype)  # scales and zero points of the int4 cache


def quantize(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D] in the storage dtype, scale [..., 1] float32), x ≈ codes * scale."""
    qmax = _MAX_CODE[kv_cache_dtype]
    x = x.float()
    # Per-vector absmax scaling: an outlier token only costs its own precision.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
    scaled = x / scale
    if kv_cache_dtype == "int8":
        return scaled.round_().clamp_(-qmax, qmax).to(torch.int8), scale
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D], scale [..., 1] -> values [..., D] in `dtype`."""
    return codes_as(codes, dtype) * scale.to(dtype)


def codes_as(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 or fp8 codes (fp8 kept as raw uint8 bytes) as numbers in `dtype`, before their scale."""
    if codes.dtype == torch.uint8:
        codes = codes.view(torch.float8_e4m3fn)
    return codes.to(dtype)


def quantize_int4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes with a range taken along `dim` (tokens for keys, channels for values).

    x [..., D] -> (packed codes [..., D / 2] uint8, scale, zero point), each parameter shaped like x
    with `dim` reduced to 1, float16; x ≈ code * scale + zero.
    """
    x = x.float()
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    # Quantize with the float16-rounded parameters, so that dequantizing them is consistent.
    zero = low.to(INT4_PARAM_DTYPE)
    scale = ((high - zero.float()) / INT4_LEVELS).to(INT4_PARAM_DTYPE)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant range: every code is 0
    codes = ((x - zero.float()) / scale.float()).round_().clamp_(0, INT4_LEVELS).to(torch.uint8)
    return pack_int4(codes), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """packed [..., D / 2] with broadcastable scale / zero -> values [..., D] in `dtype`."""
    return unpack_int4(packed).to(dtype) * scale.to(dtype) + zero.to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., D] in 0..15 -> [..., D / 2] uint8: channel i in the low nibble, channel i + D/2 in the high."""
    low, high = codes.chunk(2, dim=-1)
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., D / 2] uint8 -> codes [..., D] uint8 (the inverse of pack_int4)."""
    return torch.cat([packed & 15, packed >> 4], dim=-1)
