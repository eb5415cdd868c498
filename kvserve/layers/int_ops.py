"""Matmuls on weight-only integer weights, on kvserve's compiled kernel (native/int_matmul.c), and the torch
reference of the same math.

- int8: q int8 [out, in] and a float32 scale [out]; W = q * scale[:, None].
- int4: q in 0..15 packed two per byte, `[out, in / 2]` uint8 (`pack_nibbles`), with float32 `scale` and `minimum`
  [out, in / group]; W[o, i] = q[o, i] * scale[o, i // group] + minimum[o, i // group]. The minimum is
  -zero * scale for the zero point of an asymmetric format (RTN, AWQ).
The kernel computes x @ W^T from these without a float copy of W; `reference_*` computes it from the
dequantized W in float64, which the tests hold the kernel to.
"""

from __future__ import annotations

import torch

from kvserve import native

NIBBLE_CHUNK = 32  # values per 16 packed bytes; int4 groups are whole chunks


def available() -> bool:
    """Whether the kernels build here (a C compiler)."""
    return native.load("int_matmul") is not None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] integers in 0..15 (in a multiple of 32) -> [out, in / 2] uint8: in each 32 values, byte j
    holds value j in its low nibble and value j + 16 in its high one."""
    num_out, num_in = q.shape
    halves = q.to(torch.uint8).view(num_out, num_in // NIBBLE_CHUNK, 2, 16)  # [out, chunks, low/high, 16]
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(num_out, num_in // 2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[out, in / 2] uint8 -> q [out, in] uint8 in 0..15 (the inverse of `pack_nibbles`)."""
    num_out = packed.shape[0]
    chunks = packed.view(num_out, -1, 16)  # [out, chunks, 16]
    return torch.stack([chunks & 15, chunks >> 4], dim=2).reshape(num_out, -1)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, n] (unit column stride) = x [T, in] @ (q * scale)^T for q int8 [n, in], scale float32 [n];
    float32, CPU."""
    rows, num_in = x.shape
    assert out.stride(1) == 1 and q.is_contiguous() and scale.is_contiguous() and x.dtype == torch.float32
    x = x.contiguous()
    native.load("int_matmul").int8_matmul(x.data_ptr(), q.data_ptr(), scale.data_ptr(), out.data_ptr(), rows,
                                          num_in, q.shape[0], out.stride(0))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                out: torch.Tensor) -> None:
    """out [T, n] (unit column stride) = x [T, in] @ W^T for int4 W (packed [n, in / 2], scale and minimum
    [n, groups]); float32, CPU."""
    rows, num_in = x.shape
    group_size = num_in // scale.shape[1]
    assert group_size % NIBBLE_CHUNK == 0 and group_size * scale.shape[1] == num_in
    assert out.stride(1) == 1 and x.dtype == torch.float32
    assert packed.is_contiguous() and scale.is_contiguous() and minimum.is_contiguous()
    x = x.contiguous()
    native.load("int_matmul").int4_matmul(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(),
                                          out.data_ptr(), rows, num_in, packed.shape[0], group_size, out.stride(0))


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [out, in], scale [out] -> float32 W [out, in]."""
    return q.float() * scale.float()[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """packed [out, in / 2], scale and minimum [out, groups] -> float32 W [out, in]."""
    q = unpack_nibbles(packed).float()
    group_size = q.shape[1] // scale.shape[1]
    return q * scale.repeat_interleave(group_size, dim=1) + minimum.repeat_interleave(group_size, dim=1)


def reference_int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ dequantized W^T in float64: what `int8_matmul` computes, without its rounding."""
    return (x.double() @ dequantize_int8(q, scale).double().t()).float()


def reference_int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                          minimum: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ dequantized W^T in float64: what `int4_matmul` computes, without its rounding."""
    return (x.double() @ dequantize_int4(packed, scale, minimum).double().t()).float()
