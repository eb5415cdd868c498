"""Matmuls and row lookups on GGUF-quantized weights, on kvserve's compiled kernel (native/gguf_matmul.c).

A weight is its file's bytes, `[out, row_bytes]` uint8, in one of the block formats below. The kernel
dequantizes each block in registers exactly as ggml does and multiplies it with float32 activations, so the
result is the dequantized model's up to summation order. `reference_matmul` is the same math in torch/numpy
(gguf-py's dequantization), which the tests hold the kernel to.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from kvserve import native

# ggml type -> the kernel's name for it (native.GGUF_KERNEL_TYPES).
KERNEL_NAMES: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.F32: "f32", GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q4_1: "q4_1",
    GGMLQuantizationType.Q5_0: "q5_0", GGMLQuantizationType.Q5_1: "q5_1",
    GGMLQuantizationType.Q8_0: "q8_0", GGMLQuantizationType.Q4_K: "q4_k",
    GGMLQuantizationType.Q5_K: "q5_k", GGMLQuantizationType.Q6_K: "q6_k",
}


def available() -> bool:
    """Whether the kernel builds here (a C compiler)."""
    return native.load("gguf_matmul") is not None


def supports(qtype: GGMLQuantizationType, in_features: int) -> bool:
    """Whether rows of `in_features` values in `qtype` can be computed on (whole 32-value sub-blocks)."""
    values_per_block = GGML_QUANT_SIZES[qtype][0]
    return qtype in KERNEL_NAMES and in_features % max(values_per_block, 32) == 0


def row_bytes(qtype: GGMLQuantizationType, in_features: int) -> int:
    """Bytes of one weight row of `in_features` values."""
    values_per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    return in_features // values_per_block * block_bytes


def kernel(qtype: GGMLQuantizationType) -> Callable[..., None]:
    """The compiled matmul for `qtype`: (x*, W*, y*, rows, in, n, ldy) -> None, y [rows, ldy] float32."""
    return getattr(native.load("gguf_matmul"), f"gguf_matmul_{KERNEL_NAMES[qtype]}")


def matmul(x: torch.Tensor, weight: torch.Tensor, qtype: GGMLQuantizationType, out: torch.Tensor) -> None:
    """out [T, n] (a view with unit column stride, e.g. a column slice) = x [T, in] @ W^T for weight
    [n, row_bytes] uint8 in `qtype`; float32, CPU."""
    rows, in_features = x.shape
    assert out.stride(1) == 1 and weight.is_contiguous() and x.dtype == torch.float32
    x = x.contiguous()
    kernel(qtype)(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, in_features, weight.shape[0], out.stride(0))


ACTIVATION_BLOCK_BYTES = 44  # gguf_int8.c's act_block: 32 int8, a float scale, two scaled half sums


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [T, in] float32 -> its 8-bit blocks [T, in / 32, 44] uint8, which int8_matmul reads."""
    rows, in_features = x.shape
    x = x.contiguous()
    blocks = torch.empty(rows, in_features // 32, ACTIVATION_BLOCK_BYTES, dtype=torch.uint8)
    native.load("gguf_int8").gguf_quantize_activations(x.data_ptr(), blocks.data_ptr(), rows, in_features)
    return blocks


def int8_kernel(qtype: GGMLQuantizationType) -> Callable[..., None]:
    """The 8-bit-activation matmul for a block format: (blocks*, W*, y*, rows, in, n, ldy) -> None."""
    return getattr(native.load("gguf_int8"), f"gguf_int8_matmul_{KERNEL_NAMES[qtype]}")


def int8_matmul(blocks: torch.Tensor, weight: torch.Tensor, qtype: GGMLQuantizationType, out: torch.Tensor) -> None:
    """out [T, n] (unit column stride) ~ x @ W^T from x's 8-bit blocks [T, in / 32, 44]."""
    rows, num_blocks, _ = blocks.shape
    assert out.stride(1) == 1 and weight.is_contiguous()
    int8_kernel(qtype)(blocks.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, num_blocks * 32, weight.shape[0],
                       out.stride(0))


def activation_values(blocks: torch.Tensor) -> torch.Tensor:
    """The values 8-bit blocks [T, in / 32, 44] stand for, q * scale -> float64 [T, in]."""
    codes = blocks[..., :32].contiguous().view(torch.int8).double()
    scales = blocks[..., 32:36].contiguous().view(torch.float32).double()
    return (codes * scales).reshape(blocks.shape[0], -1)


def reference_int8_matmul(blocks: torch.Tensor, weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """What int8_matmul computes from these blocks, in float64: their values times the dequantized W."""
    values = activation_values(blocks)
    return (values @ dequantize_weight(weight, qtype, values.shape[1]).double().t()).float()


def dequantize_rows(weight: torch.Tensor, qtype: GGMLQuantizationType, ids: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """Rows `ids` [T] of a quantized weight [n, row_bytes] -> float32 [T, in_features] (embedding lookup)."""
    ids = ids.to(torch.int64).contiguous()
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < weight.shape[0]:
        raise IndexError(f"token id out of range [0, {weight.shape[0]})")
    out = torch.empty(ids.numel(), in_features)
    function = getattr(native.load("gguf_matmul"), f"gguf_dequantize_{KERNEL_NAMES[qtype]}")
    function(weight.data_ptr(), ids.data_ptr(), out.data_ptr(), ids.numel(), in_features)
    return out.view(*ids.shape, in_features)


def dequantize_weight(weight: torch.Tensor, qtype: GGMLQuantizationType, in_features: int) -> torch.Tensor:
    """The whole weight [n, row_bytes] -> float32 [n, in_features], with gguf-py (the reference decoder)."""
    values = dequantize(weight.cpu().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(weight.shape[0], in_features)


def reference_matmul(x: torch.Tensor, weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """x [T, in] @ dequantize(W)^T in float64: what `matmul` computes, without its rounding."""
    dense = dequantize_weight(weight, qtype, x.shape[1])
    return (x.double() @ dense.double().t()).float()
