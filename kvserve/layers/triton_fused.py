"""Fused elementwise kernels in Triton (CUDA): RMSNorm (with the residual add before it), SiLU-and-mul, RoPE in place.

Each replaces a few torch ops (and their round trips through memory) with one kernel, one program per token row.
The math is the torch reference's (layers/norm.py, activation.py, rotary.py), in float32 registers and rounded
once to the model dtype at the end: equal to the reference in float32 up to summation order, within a rounding in
half types. Tested on CPU tensors under TRITON_INTERPRET=1 against those references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.layers.activation import silu_and_mul as torch_silu_and_mul
from kvserve.layers.rotary import apply_rotary as torch_apply_rotary


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, dim, eps,
                     stride_x, stride_r, stride_o, stride_s, BLOCK: tl.constexpr, ADD: tl.constexpr):
    """Row t: s = x (+ residual, stored to sum_ptr), out = weight * (s / rms(s)); float32 inside."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        # Added in float32 and rounded to the model dtype, as torch adds half types.
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty)  # rounded like the reference before the weight
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, size, stride_x, stride_o, BLOCK: tl.constexpr):
    """Row t, columns of one tile: silu(gate) * up, gate = x[:size], up = x[size:]."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # rounded like F.silu's output
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, num_heads, stride_xt, stride_xh, stride_ct, stride_st,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t, all its heads: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written back in place."""
    tok = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    first = x_ptr + tok * stride_xt + heads * stride_xh + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + tok * stride_ct + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + tok * stride_st + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., dim] as [rows, dim] with unit column stride (a view where it can be)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] -> weight * x / rms(x), as layers/norm.py's rms_norm (a NormKernel)."""
    rows = _rows(x)
    out = torch.empty_like(rows)
    _rms_norm_kernel[(rows.shape[0],)](rows, rows, weight, out, out, rows.shape[1], eps,
                                       rows.stride(0), 0, out.stride(0), 0,
                                       BLOCK=triton.next_power_of_2(rows.shape[1]), ADD=False)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [T, dim]: one pass over both."""
    rows, res = _rows(x), _rows(residual)
    out, summed = torch.empty_like(rows), torch.empty_like(rows)
    _rms_norm_kernel[(rows.shape[0],)](rows, res, weight, out, summed, rows.shape[1], eps,
                                       rows.stride(0), res.stride(0), out.stride(0), summed.stride(0),
                                       BLOCK=triton.next_power_of_2(rows.shape[1]), ADD=True)
    return out.view(x.shape), summed.view(x.shape)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * I] (gate then up) -> [..., I], as layers/activation.py's."""
    rows = _rows(gate_up)
    size = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], size, dtype=rows.dtype, device=rows.device)
    block = min(1024, triton.next_power_of_2(size))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(size, block))](rows, out, size, rows.stride(0), out.stride(0),
                                                                    BLOCK=block)
    return out.view(*gate_up.shape[:-1], size)


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate heads x [T, H, D] in place by cos/sin [T, 1, D] (rotate-half: both halves of a row hold the same
    angles) and return x, as layers/rotary.py's apply_rotary returns its new tensor."""
    cos, sin = cos_sin
    num_tokens, num_heads, head_dim = x.shape
    if num_tokens == 0:
        return x
    if x.stride(-1) != 1:
        raise ValueError("apply_rotary: the head dimension must be contiguous")
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](x, cos, sin, num_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                                  HALF=half, BLOCK_H=triton.next_power_of_2(num_heads),
                                  BLOCK_D=triton.next_power_of_2(half))
    return x


# The torch references these kernels replace, for Platform.prepare_model.
REPLACEMENTS = {torch_silu_and_mul: silu_and_mul, torch_apply_rotary: apply_rotary}
