"""Matmuls on weight-only integer weights in Triton (CUDA): int8 per channel and group-wise int4 (RTN and AWQ).

The same layouts and contract as layers/int_ops.py, the CPU's compiled kernels (see there):
- int8: q int8 [out, in], scale float32 [out]; y = (x @ q^T) * scale.
- int4: packed [out, in / 2] uint8 (in each 32 values, byte j holds value j low and value j + 16 high), scale
  and minimum float32 [out, in / group]; W[o, i] = q * scale[o, g] + minimum[o, g], g = i // group.
Each program computes a [BLOCK_M, BLOCK_N] tile of y: it loads the integer codes of a [BLOCK_N, BLOCK_K] tile of
W, dequantizes them in registers in the activations' dtype and multiplies with tl.dot, accumulating in float32.
No float copy of W is ever made. Tested on CPU tensors under TRITON_INTERPRET=1 against int_ops' references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K = 64, 64


@triton.jit
def _x_tile(x_ptr, offs_m, k, rows, num_in):
    """The activations' [M, K] tile at rows offs_m, columns k; zeros past the edges."""
    return tl.load(x_ptr + offs_m[:, None] * num_in + k[None, :],
                   mask=(offs_m[:, None] < rows) & (k[None, :] < num_in), other=0.0)


@triton.jit
def _int8_tile(acc, x_ptr, q_ptr, offs_m, offs_n, k0, rows, num_in, num_out, BLOCK_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """acc [M, N] + x[:, k0:k0 + BLOCK_K] @ q[:, k0:k0 + BLOCK_K]^T (codes unscaled)."""
    k = k0 + tl.arange(0, BLOCK_K)
    x = _x_tile(x_ptr, offs_m, k, rows, num_in)
    q = tl.load(q_ptr + offs_n[:, None] * num_in + k[None, :],
                mask=(offs_n[:, None] < num_out) & (k[None, :] < num_in), other=0)  # [N, K] int8
    # |q| <= 127 is exact in every float dtype, so the scale waits for the accumulated sum
    return acc + tl.dot(x, tl.trans(q.to(x.dtype)), input_precision=DOT_PRECISION)


@triton.jit
def _int4_tile(acc, x_ptr, packed_ptr, scale_ptr, min_ptr, offs_m, offs_n, k0, rows, num_in, num_out, group_size,
               BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [M, N] + x[:, k0:k0 + BLOCK_K] @ W[:, k0:k0 + BLOCK_K]^T, W dequantized from its codes here."""
    k = k0 + tl.arange(0, BLOCK_K)
    x = _x_tile(x_ptr, offs_m, k, rows, num_in)
    w_mask = (offs_n[:, None] < num_out) & (k[None, :] < num_in)
    # value k: byte (k // 32) * 16 + k % 16 of the row, its low nibble for k % 32 < 16, its high one after
    byte = (k // 32) * 16 + k % 16
    shift = ((k % 32) // 16) * 4
    packed = tl.load(packed_ptr + offs_n[:, None] * (num_in // 2) + byte[None, :], mask=w_mask, other=0)
    codes = ((packed >> shift[None, :].to(tl.uint8)) & 15).to(tl.float32)  # [N, K]
    group = offs_n[:, None] * (num_in // group_size) + (k // group_size)[None, :]
    scale = tl.load(scale_ptr + group, mask=w_mask, other=0.0)
    minimum = tl.load(min_ptr + group, mask=w_mask, other=0.0)
    w = (codes * scale + minimum).to(x.dtype)  # the dequantized tile, in the activations' dtype
    return acc + tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)


@triton.jit
def _int8_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, rows, num_in, num_out, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INTERPRET:  # Triton 3.6's interpreter cannot range() over a tensor bound with numpy >= 2.4 (triton#9171)
        k0 = 0
        while k0 < num_in:
            acc = _int8_tile(acc, x_ptr, q_ptr, offs_m, offs_n, k0, rows, num_in, num_out, BLOCK_K, DOT_PRECISION)
            k0 += BLOCK_K
    else:  # a for loop, which the compiler software-pipelines
        for k0 in range(0, num_in, BLOCK_K):
            acc = _int8_tile(acc, x_ptr, q_ptr, offs_m, offs_n, k0, rows, num_in, num_out, BLOCK_K, DOT_PRECISION)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < num_out, other=0.0)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], (acc * scale[None, :]).to(
        out_ptr.dtype.element_ty), mask=(offs_m[:, None] < rows) & (offs_n[None, :] < num_out))


@triton.jit
def _int4_kernel(x_ptr, packed_ptr, scale_ptr, min_ptr, out_ptr, rows, num_in, num_out, group_size, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INTERPRET:  # as in _int8_kernel
        k0 = 0
        while k0 < num_in:
            acc = _int4_tile(acc, x_ptr, packed_ptr, scale_ptr, min_ptr, offs_m, offs_n, k0, rows, num_in, num_out,
                             group_size, BLOCK_K, DOT_PRECISION)
            k0 += BLOCK_K
    else:
        for k0 in range(0, num_in, BLOCK_K):
            acc = _int4_tile(acc, x_ptr, packed_ptr, scale_ptr, min_ptr, offs_m, offs_n, k0, rows, num_in, num_out,
                             group_size, BLOCK_K, DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < rows) & (offs_n[None, :] < num_out))


# Whether the kernels run under the interpreter (TRITON_INTERPRET=1 when this module was imported).
IS_INTERPRETED = not isinstance(_int8_kernel, triton.runtime.JITFunction)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 stays float32 in tl.dot (TF32 would round the activations to 10 bits); half types ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _grid(rows: int, num_out: int) -> tuple[tuple[int, int], int]:
    """The launch grid and BLOCK_M: tl.dot needs at least 16 rows, so a decode step pads to 16."""
    block_m = 16 if rows <= 16 else 64
    return (triton.cdiv(rows, block_m), triton.cdiv(num_out, BLOCK_N)), block_m


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, n] (unit column stride) = x [T, in] @ (q * scale)^T for q int8 [n, in], scale float32 [n]."""
    rows, num_in = x.shape
    assert out.stride(1) == 1 and q.is_contiguous() and scale.is_contiguous()
    x = x.contiguous()
    grid, block_m = _grid(rows, q.shape[0])
    _int8_kernel[grid](x, q, scale, out, rows, num_in, q.shape[0], out.stride(0),
                       BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, INTERPRET=IS_INTERPRETED,
                       DOT_PRECISION=_dot_precision(x.dtype))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                out: torch.Tensor) -> None:
    """out [T, n] (unit column stride) = x [T, in] @ W^T for int4 W (packed [n, in / 2], scale and minimum
    [n, groups])."""
    rows, num_in = x.shape
    group_size = num_in // scale.shape[1]
    assert group_size % 32 == 0 and group_size * scale.shape[1] == num_in
    assert out.stride(1) == 1 and packed.is_contiguous() and scale.is_contiguous() and minimum.is_contiguous()
    x = x.contiguous()
    grid, block_m = _grid(rows, packed.shape[0])
    _int4_kernel[grid](x, packed, scale, minimum, out, rows, num_in, packed.shape[0], group_size, out.stride(0),
                       BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, INTERPRET=IS_INTERPRETED,
                       DOT_PRECISION=_dot_precision(x.dtype))
