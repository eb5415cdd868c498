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


# Formats the 8-bit path keeps with eight rows interleaved -> bytes of a block's scale header (d, or d and m).
INTERLEAVED_HEADERS: dict[GGMLQuantizationType, int] = {GGMLQuantizationType.Q4_0: 2, GGMLQuantizationType.Q4_1: 4,
                                                        GGMLQuantizationType.Q8_0: 2}
ROWS_PER_TILE = 8


def interleavable(qtype: GGMLQuantizationType, rows: int) -> bool:
    """Whether a weight of `rows` rows in `qtype` can be laid out as tiles of eight rows."""
    return qtype in INTERLEAVED_HEADERS and rows % ROWS_PER_TILE == 0


def interleave_rows8(weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """A Q4_0 / Q4_1 / Q8_0 weight [n, row_bytes] -> the same bytes, tiled as gguf_int8.c's *x8 kernels read them.

    Per tile of 8 rows and per 32-value block: the 8 rows' d (and m), then words of 32 bytes, word p holding code
    bytes 4p..4p+3 of each row in turn. Same shape [n, row_bytes]; row 8t+k is no longer row 8t+k of the result.
    """
    header, block_bytes = INTERLEAVED_HEADERS[qtype], GGML_QUANT_SIZES[qtype][1]
    blocks = weight.view(weight.shape[0] // 8, 8, -1, block_bytes).transpose(1, 2)  # [tiles, blocks, 8 rows, bytes]
    scales = [blocks[..., field:field + 2].flatten(-2) for field in range(0, header, 2)]  # [tiles, blocks, 16] each
    words = blocks[..., header:].unflatten(-1, (-1, 4)).transpose(-3, -2).flatten(-3)  # [tiles, blocks, 8 * codes]
    return torch.cat([*scales, words], dim=-1).view(weight.shape)


def deinterleave_rows8(tiles: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """The inverse of interleave_rows8: the file's row-major bytes [n, row_bytes]."""
    header, block_bytes = INTERLEAVED_HEADERS[qtype], GGML_QUANT_SIZES[qtype][1]
    blocks = tiles.reshape(tiles.shape[0] // 8, tiles.shape[1] // block_bytes, -1)  # [tiles, blocks, 8 * bytes]
    scales = [blocks[..., 8 * field:8 * field + 16].unflatten(-1, (8, 2)) for field in range(0, header, 2)]
    words = blocks[..., 8 * header:].unflatten(-1, (-1, 8, 4)).transpose(-3, -2).flatten(-2)  # [.., 8 rows, codes]
    return torch.cat([*scales, words], dim=-1).transpose(1, 2).reshape(tiles.shape)


def interleaved_int8_kernel(qtype: GGMLQuantizationType) -> Callable[..., None]:
    """The 8-bit-activation matmul on interleave_rows8's tiles: (blocks*, tiles*, y*, rows, in, n, ldy) -> None."""
    return getattr(native.load("gguf_int8"), f"gguf_int8_matmul_{KERNEL_NAMES[qtype]}x8")


def interleaved_int8_matmul(blocks: torch.Tensor, tiles: torch.Tensor, qtype: GGMLQuantizationType,
                            out: torch.Tensor) -> None:
    """out [T, n] (unit column stride) ~ x @ W^T from x's 8-bit blocks and W's interleave_rows8 tiles."""
    rows, num_blocks, _ = blocks.shape
    assert out.stride(1) == 1 and tiles.is_contiguous()
    interleaved_int8_kernel(qtype)(blocks.data_ptr(), tiles.data_ptr(), out.data_ptr(), rows, num_blocks * 32,
                                   tiles.shape[0], out.stride(0))


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
    ids = checked_ids(ids, weight.shape[0])
    out = torch.empty(ids.numel(), in_features)
    function = getattr(native.load("gguf_matmul"), f"gguf_dequantize_{KERNEL_NAMES[qtype]}")
    function(weight.data_ptr(), ids.data_ptr(), out.data_ptr(), ids.numel(), in_features)
    return out.view(*ids.shape, in_features)


def checked_ids(ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """ids as contiguous int64, or IndexError naming the range when one is outside [0, num_rows)."""
    ids = ids.to(torch.int64).contiguous()
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < num_rows:
        raise IndexError(f"token id out of range [0, {num_rows})")
    return ids


def dequantize_weight(weight: torch.Tensor, qtype: GGMLQuantizationType, in_features: int) -> torch.Tensor:
    """The whole weight [n, row_bytes] -> float32 [n, in_features], with gguf-py (the reference decoder)."""
    values = dequantize(weight.cpu().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(weight.shape[0], in_features)


def reference_matmul(x: torch.Tensor, weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """x [T, in] @ dequantize(W)^T in float64: what `matmul` computes, without its rounding."""
    dense = dequantize_weight(weight, qtype, x.shape[1])
    return (x.double() @ dense.double().t()).float()
