"""Triton MLA over the latent cache: the latent write and the absorbed decode.

The latent cache holds one row [d_c + d_r] per token (attention/mla.py): c_kv, then the shared RoPE key; one KV
head, no value tensor; int8/fp8 rows carry one float32 scale. A decode's H query heads, folded into latent space
([B, H, d_c + d_r], models/deepseek.py), all read that one row per key: MQA with keys of width d_c + d_r and
values of width d_c (each row's first d_c columns, read once for both). Split-KV like the GQA decode: a program
per (request, tile of heads, partition of keys), merged by log-sum-exp with triton_attention's merge kernel.
Tested against mla.absorbed_decode (torch) under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.attention.triton_attention import (
    _LOG2E,
    _QUANT_MODES,
    DEFAULT_PARTITION_SIZE,
    IS_INTERPRETED,
    _dequantize,
    _dot_precision,
    _merge_kernel,
    _store_rows,
    _use_native_fp8,
    partitioning,
)
from kvserve.kv.kv_cache import LayerKVCache

# Keys per tile: on the GPU a [BLOCK_N, d_c] tile of 512-wide rows must fit beside the [16, d_c] accumulator
# (first guesses, not tuned); the interpreter wants few, large tiles.
_BLOCK_N = 256 if IS_INTERPRETED else 32
_BLOCK_H = 16  # query heads per program (tl.dot's smallest M)


@triton.jit
def _write_latent_kernel(latent_ptr, slot_ptr, cache_ptr, scale_ptr, num_tokens, block_size, stride_lt,
                         stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                         HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    """One program stores BLOCK_R latent rows at their slots (a negative slot, padding, writes nothing)."""
    tok = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1)
    _store_rows(latent_ptr, stride_lt, 0, cache_ptr, scale_ptr, tok, tok * 0, slot // block_size, slot % block_size,
                slot >= 0, stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, HEAD_DIM, BLOCK_D, QUANT)


@triton.jit
def _latent_tile(q_c, q_r, m_i, l_i, acc, tile, end, block_table_ptr, block_size, cache_ptr, scale_ptr,
                 stride_cb, stride_cs, stride_sb, stride_ss, qk_scale,
                 LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_N: tl.constexpr, QUANT: tl.constexpr, FP8_NATIVE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of the heads' latent queries over keys tile .. tile + BLOCK_N (those < end)."""
    pos = tile + tl.arange(0, BLOCK_N)
    in_seq = pos < end
    block = tl.load(block_table_ptr + pos // block_size, mask=in_seq, other=0)
    offset = pos % block_size
    row = cache_ptr + block * stride_cb + offset * stride_cs  # [N] row starts (one KV head)
    c_dims = tl.arange(0, BLOCK_C)
    r_dims = tl.arange(0, BLOCK_R)
    # Masked rows load 0: a NaN left in an unused slot must not reach p @ c.
    c = tl.load(row[:, None] + c_dims[None, :], mask=in_seq[:, None] & (c_dims < LATENT)[None, :], other=0)
    r = tl.load(row[:, None] + LATENT + r_dims[None, :], mask=in_seq[:, None] & (r_dims < ROPE)[None, :], other=0)
    if QUANT != 0:
        scale = tl.load(scale_ptr + block * stride_sb + offset * stride_ss, mask=in_seq, other=0.0)[:, None]
        c = _dequantize(c, scale, QUANT, FP8_NATIVE)
        r = _dequantize(r, scale, QUANT, FP8_NATIVE)
    c = c.to(q_c.dtype)
    r = r.to(q_c.dtype)
    scores = (tl.dot(q_c, tl.trans(c), input_precision=DOT_PRECISION)
              + tl.dot(q_r, tl.trans(r), input_precision=DOT_PRECISION)) * qk_scale  # [H, N], log2 units
    scores = tl.where(in_seq[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _mla_decode_kernel(q_ptr, cache_ptr, scale_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr, qk_scale,
                       num_heads, block_size, stride_qb, stride_qh, stride_bt, stride_cb, stride_cs, stride_sb,
                       stride_ss, stride_ob, stride_oh, stride_op, stride_lb, stride_lh,
                       LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
                       QUANT: tl.constexpr, FP8_NATIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       STORE_LSE: tl.constexpr, INTERPRET: tl.constexpr):
    """Program (request, tile of query heads, partition): those heads over one slice of the request's latents."""
    req = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    start = part * PARTITION_SIZE
    if start >= seq_len:  # past this request's end: the merge never reads it
        return
    end = tl.minimum(start + PARTITION_SIZE, seq_len)
    is_head = heads < num_heads
    c_dims = tl.arange(0, BLOCK_C)
    r_dims = tl.arange(0, BLOCK_R)
    q_row = q_ptr + req * stride_qb + heads[:, None] * stride_qh
    q_c = tl.load(q_row + c_dims[None, :], mask=is_head[:, None] & (c_dims < LATENT)[None, :], other=0.0)
    q_r = tl.load(q_row + LATENT + r_dims[None, :], mask=is_head[:, None] & (r_dims < ROPE)[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    table = block_tables_ptr + req * stride_bt
    if INTERPRET:  # Triton 3.6's interpreter cannot range() over tensor bounds (see triton_attention._attend)
        tile = start
        while tile < end:
            m_i, l_i, acc = _latent_tile(q_c, q_r, m_i, l_i, acc, tile, end, table, block_size, cache_ptr, scale_ptr,
                                         stride_cb, stride_cs, stride_sb, stride_ss, qk_scale, LATENT, ROPE, BLOCK_C,
                                         BLOCK_R, BLOCK_N, QUANT, FP8_NATIVE, DOT_PRECISION)
            tile += BLOCK_N
    else:
        for tile in range(start, end, BLOCK_N):
            m_i, l_i, acc = _latent_tile(q_c, q_r, m_i, l_i, acc, tile, end, table, block_size, cache_ptr, scale_ptr,
                                         stride_cb, stride_cs, stride_sb, stride_ss, qk_scale, LATENT, ROPE, BLOCK_C,
                                         BLOCK_R, BLOCK_N, QUANT, FP8_NATIVE, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + req * stride_ob + heads[:, None] * stride_oh + part * stride_op + c_dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=is_head[:, None] & (c_dims < LATENT)[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + req * stride_lb + heads * stride_lh + part, m_i + tl.log2(l_i), mask=is_head)


def _latent_args(cache: LayerKVCache) -> tuple[torch.Tensor, int, tuple[int, ...], int]:
    """The scale tensor (the rows themselves when unquantized: never read), block size, strides (block, slot,
    head of the rows, then of the scales) and the QUANT constexpr of a latent cache."""
    quant = _QUANT_MODES[cache.kv_cache_dtype]
    scale = cache.key_scale if quant else cache.key
    return scale, cache.key.shape[1], (*cache.key.stride()[:3], *scale.stride()[:3]), quant


def write_latent(latent: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
    """Store latents [T, d_c + d_r] at their slots (negative = skip), quantizing for int8/fp8 caches."""
    num_tokens, width = latent.shape
    if num_tokens == 0:
        return
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    k_scale, block_size, strides, quant = _latent_args(cache)
    block_d = triton.next_power_of_2(width)
    block_r = max(1, (16384 if IS_INTERPRETED else 4096) // block_d)
    _write_latent_kernel[(triton.cdiv(num_tokens, block_r),)](
        latent, slot_mapping, cache.key, k_scale, num_tokens, block_size, latent.stride(0), *strides,
        HEAD_DIM=width, BLOCK_R=block_r, BLOCK_D=block_d, QUANT=quant)


def absorbed_decode(query: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    kv_lora_rank: int, scale: float, partition_size: int = DEFAULT_PARTITION_SIZE) -> torch.Tensor:
    """Latent queries [B, H, d_c + d_r], tables [B, max_blocks], seq_lens [B] -> latents [B, H, d_c] weighted by
    attention over each request's cached rows."""
    batch, num_heads, width = query.shape
    rope = width - kv_lora_rank
    out = query.new_empty(batch, num_heads, kv_lora_rank)
    if batch == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    if partition_size % _BLOCK_N:
        raise ValueError(f"partition_size must be a multiple of {_BLOCK_N}, got {partition_size}")
    k_scale, block_size, strides, quant = _latent_args(cache)
    partition_size, num_parts = partitioning(block_tables.shape[1] * block_size, partition_size)
    block_c = max(16, triton.next_power_of_2(kv_lora_rank))
    if num_parts == 1:
        partial, lse, partial_strides = out, out, (out.stride(0), out.stride(1), 0)
    else:
        partial = torch.empty(batch, num_heads, num_parts, kv_lora_rank, dtype=torch.float32, device=query.device)
        lse = torch.empty(batch, num_heads, num_parts, dtype=torch.float32, device=query.device)
        partial_strides = partial.stride()[:3]
    _mla_decode_kernel[(batch, triton.cdiv(num_heads, _BLOCK_H), num_parts)](
        query, cache.key, k_scale, block_tables, seq_lens, partial, lse, scale * _LOG2E, num_heads, block_size,
        query.stride(0), query.stride(1), block_tables.stride(0), strides[0], strides[1], strides[3], strides[4],
        *partial_strides, lse.stride(0), lse.stride(1),
        LATENT=kv_lora_rank, ROPE=rope, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(rope)),
        BLOCK_H=_BLOCK_H, BLOCK_N=_BLOCK_N, PARTITION_SIZE=partition_size, QUANT=quant,
        FP8_NATIVE=_use_native_fp8(query.device), DOT_PRECISION=_dot_precision(query.dtype),
        STORE_LSE=num_parts > 1, INTERPRET=IS_INTERPRETED, num_warps=8 if block_c >= 256 else 4)
    if num_parts > 1:
        _merge_kernel[(batch, num_heads)](
            partial, lse, seq_lens, seq_lens, out, *partial.stride()[:3], lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), HEAD_DIM=kv_lora_rank, BLOCK_D=block_c,
            BLOCK_P=triton.next_power_of_2(num_parts), PARTITION_SIZE=partition_size, HAS_STARTS=False,
            num_warps=4)
    return out
