"""Triton paged attention: KV write (quantizing int8/fp8 on the way in), split-KV decode and varlen prefill.

The kernels read and write exactly the layout of `torch_ref` / `LayerKVCache`: key/value
[num_blocks, block_size, Hkv, D] and, for int8/fp8 caches, codes (int8, or uint8 raw e4m3 bytes)
plus float32 scales [num_blocks, block_size, Hkv, 1]. They run on CUDA tensors, or on CPU tensors
when TRITON_INTERPRET=1 was set before this module was imported (how the tests run without a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvserve.attention import mla, torch_ref
from kvserve.attention.backend import AttentionBackend, AttentionRequirements, CommonAttentionMetadata, MLABackend
from kvserve.attention.torch_metadata import PrefillSeq, prefill_seq, sliding_key_ranges
from kvserve.kv.int4_residual import Int4WritePlan, ResidualColumns, ResidualTails
from kvserve.kv.kv_cache import LayerKVCache

# kv_cache_dtype -> the QUANT constexpr of the kernels (int4: KIVI's layout, kv/int4_residual.py).
_QUANT_MODES = {"auto": 0, "int8": 1, "fp8": 2, "int4": 3}
_LOG2E = 1.4426950408889634
DEFAULT_PARTITION_SIZE = 512  # keys per split-KV partition of the decode kernel
MAX_PARTITIONS = 32  # split-KV partitions per row at most: wider tables get longer partitions


# ---------------------------------------------------------------------------- device helpers


@triton.jit
def _round_half_even(x):
    """float32 -> int32, ties to even like torch.round (no rint in the interpreter)."""
    floor = tl.floor(x)
    frac = x - floor  # exact for |x| < 2**23
    whole = floor.to(tl.int32)
    is_up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
    return whole + is_up.to(tl.int32)


@triton.jit
def _fp8_encode(x):
    """float32 -> e4m3fn bytes, round to nearest even: torch's float8_e4m3fn conversion for |x| <= 464.

    Done on the bits: Triton 3.6's interpreter rounds fp8 casts wrongly (a mantissa carry can halve the
    value), and sm < 89 has no e4m3 type. Past 448 it saturates where torch gives NaN; quantized values
    never exceed 448.
    """
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    mag = tl.minimum(tl.abs(x), 448.0)
    bits = mag.to(tl.int32, bitcast=True)
    # Normal range: rebias the exponent (127 -> 7) and round the mantissa to 3 bits, carries included.
    normal = (bits + (((7 - 127) << 23) + 0x7FFFF) + ((bits >> 20) & 1)) >> 20
    # Below 2**-6 (subnormal e4m3): adding 2**14 leaves an ulp of 2**-9, the subnormal step, so the
    # hardware's round-to-nearest-even does the rounding; the low bits are then the code.
    subnormal = (mag + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    code = tl.where(bits < (121 << 23), subnormal, normal)
    return (code | sign).to(tl.uint8)


@triton.jit
def _fp8_decode(code):
    """e4m3fn bytes (uint8) -> float32 via integer ops (portable: no fp8 type needed)."""
    bits = code.to(tl.int32)
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    normal = (((exponent + (127 - 7)) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125  # mantissa * 2**-9
    mag = tl.where(exponent == 0, subnormal, normal)
    return tl.where(bits >= 128, -mag, mag)


@triton.jit
def _dequantize(codes, scale, QUANT: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """Codes [N, D] and float32 scales [N, 1] -> float32 values [N, D]."""
    if QUANT == 1:
        values = codes.to(tl.float32)
    elif FP8_NATIVE:
        values = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        values = _fp8_decode(codes)
    return values * scale


@triton.jit
def _int4_dequantize(packed, dims, scale, zero, HEAD_DIM: tl.constexpr):
    """Packed bytes [N, D], each loaded at both of its channels, and float16 scales / zero points broadcastable to
    [N, D] -> float32 values code * scale + zero [N, D]. Channel i < D / 2 is a byte's low nibble, i + D / 2 its
    high one (kv_quant.pack_int4)."""
    shift = tl.where(dims >= HEAD_DIM // 2, 4, 0)
    codes = (packed.to(tl.int32) >> shift[None, :]) & 15
    return codes.to(tl.float32) * scale.to(tl.float32) + zero.to(tl.float32)


@triton.jit
def _bfloat16_rne(x):
    """float32 -> bfloat16 rounded to nearest, ties to even, NaN to 0x7FC0: torch's rounding, spelled out in integers
    because the interpreter's conversion truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_rows(src_ptr, stride_src_t, stride_src_h, cache_ptr, scale_ptr, tok, head, block, offset, is_valid,
                stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    """Copy rows [R, D] of one source into their cache slots, quantizing per row if QUANT."""
    dims = tl.arange(0, BLOCK_D)
    mask = is_valid[:, None] & (dims < HEAD_DIM)[None, :]
    rows = tl.load(src_ptr + tok[:, None] * stride_src_t + head[:, None] * stride_src_h + dims[None, :],
                   mask=mask, other=0.0)
    slot_off = block * stride_cb + offset * stride_cs + head * stride_ch  # [R]
    dst = cache_ptr + slot_off[:, None] + dims[None, :]
    if QUANT == 0:
        if dst.dtype.element_ty == tl.bfloat16 and rows.dtype == tl.float32:  # a float32 model's bfloat16 cache
            rows = _bfloat16_rne(rows)
        tl.store(dst, rows, mask=mask)  # (to a float16 cache, rounded to nearest even)
    else:
        # Same float32 math as kv_quant.quantize: scale = max(absmax, 1e-8) / qmax, codes = x / scale.
        rows = rows.to(tl.float32)
        qmax = 127.0 if QUANT == 1 else 448.0
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(rows), axis=1), 1e-8), qmax)  # [R]
        scaled = tl.math.div_rn(rows, scale[:, None])
        if QUANT == 1:
            codes = tl.minimum(tl.maximum(_round_half_even(scaled), -127), 127).to(tl.int8)
        else:
            codes = _fp8_encode(scaled)
        tl.store(dst, codes, mask=mask)
        tl.store(scale_ptr + block * stride_sb + offset * stride_ss + head * stride_sh, scale, mask=is_valid)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                     num_rows, num_kv_heads, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                     HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    """One program stores BLOCK_R (token, KV head) rows of both K and V."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = rows // num_kv_heads
    head = rows % num_kv_heads
    slot = tl.load(slot_ptr + tok, mask=rows < num_rows, other=-1)
    is_valid = slot >= 0  # a negative slot (padding) writes nothing
    block = slot // block_size
    offset = slot % block_size
    _store_rows(key_ptr, stride_kt, stride_kh, k_cache_ptr, k_scale_ptr, tok, head, block, offset, is_valid,
                stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, HEAD_DIM, BLOCK_D, QUANT)
    _store_rows(value_ptr, stride_vt, stride_vh, v_cache_ptr, v_scale_ptr, tok, head, block, offset, is_valid,
                stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, HEAD_DIM, BLOCK_D, QUANT)


@triton.jit
def _attend_tile(q, q_pos, m_i, l_i, acc, tile, num_keys, block_table_ptr, block_size, kv_head,
                 k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                 stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, qk_scale,
                 key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh, fresh_row, use_fresh,
                 held_ptr, sink_q, num_sinks, stream_window,
                 k_zero_ptr, v_zero_ptr, stride_pb, stride_ph, res_k_ptr, res_v_ptr, stride_rs, stride_rh, tail_column,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
                 FP8_NATIVE: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 HAS_FRESH: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, STREAMING: tl.constexpr):
    """One online-softmax step of rows q [M, D] over keys tile .. tile + BLOCK_N (those < num_keys).

    IS_CAUSAL: row r sees only keys at positions <= q_pos[r], and with WINDOW > 0 only those > q_pos[r] - WINDOW.
    HAS_FRESH and use_fresh: read the keys from this step's unquantized key/value rows fresh_row + position
    instead of the cache. SOFT_CAP > 0: scores s become cap * tanh(s / cap) (Gemma 2), SOFT_CAP = cap in log2
    units (cap * log2(e)).
    STREAMING (attention sinks + window, kv/window_layout.py): the table's columns are the kept blocks, whose
    logical block numbers are held_ptr's; row r sees key positions < num_sinks and those in
    (q_pos[r] - stream_window, q_pos[r]], and scores the sinks with its sink query sink_q [M, D].
    QUANT 3 (int4): codes [.., D / 2]; key scales / zero points per channel and block at k_scale_ptr / k_zero_ptr
    (strides stride_pb, stride_ph), value ones per token (as int8's scales); table column tail_column (-1: none) is
    the request's incomplete block, read from its full-precision residual slot res_k_ptr / res_v_ptr instead.
    """
    dims = tl.arange(0, BLOCK_D)
    pos = tile + tl.arange(0, BLOCK_N)
    in_seq = pos < num_keys
    if HAS_FRESH:
        is_fresh = in_seq & use_fresh
        in_seq = in_seq & (use_fresh == 0)
    # Paged gather: position -> (physical block from the table, offset in the block).
    block = tl.load(block_table_ptr + pos // block_size, mask=in_seq, other=0)
    offset = pos % block_size
    slot_off = block * stride_cb + offset * stride_cs + kv_head * stride_ch  # [N]
    mask = in_seq[:, None] & (dims < HEAD_DIM)[None, :]
    code_dims = dims
    if QUANT == 3:  # channels i and i + D / 2 share a byte
        code_dims = dims % (HEAD_DIM // 2)
    # Masked rows load 0: a NaN left in an unused cache slot must not reach p @ V.
    k = tl.load(k_cache_ptr + slot_off[:, None] + code_dims[None, :], mask=mask, other=0)  # [N, D]
    v = tl.load(v_cache_ptr + slot_off[:, None] + code_dims[None, :], mask=mask, other=0)
    if QUANT == 3:
        param_off = (block * stride_pb + kv_head * stride_ph)[:, None] + dims[None, :]  # the key block's channels
        k = _int4_dequantize(k, dims, tl.load(k_scale_ptr + param_off, mask=mask, other=0.0),
                             tl.load(k_zero_ptr + param_off, mask=mask, other=0.0), HEAD_DIM)
        scale_off = block * stride_sb + offset * stride_ss + kv_head * stride_sh
        v = _int4_dequantize(v, dims, tl.load(v_scale_ptr + scale_off, mask=in_seq, other=0.0)[:, None],
                             tl.load(v_zero_ptr + scale_off, mask=in_seq, other=0.0)[:, None], HEAD_DIM)
        tail_mask = mask & (pos // block_size == tail_column)[:, None]
        residual_off = (offset * stride_rs + kv_head * stride_rh)[:, None] + dims[None, :]
        k = tl.where(tail_mask, tl.load(res_k_ptr + residual_off, mask=tail_mask, other=0.0).to(tl.float32), k)
        v = tl.where(tail_mask, tl.load(res_v_ptr + residual_off, mask=tail_mask, other=0.0).to(tl.float32), v)
    elif QUANT != 0:
        scale_off = block * stride_sb + offset * stride_ss + kv_head * stride_sh
        k_scale = tl.load(k_scale_ptr + scale_off, mask=in_seq, other=0.0)
        v_scale = tl.load(v_scale_ptr + scale_off, mask=in_seq, other=0.0)
        k = _dequantize(k, k_scale[:, None], QUANT, FP8_NATIVE)
        v = _dequantize(v, v_scale[:, None], QUANT, FP8_NATIVE)
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if HAS_FRESH:
        fresh_mask = is_fresh[:, None] & (dims < HEAD_DIM)[None, :]
        rows = fresh_row + pos
        fresh_k = tl.load(key_ptr + rows[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=fresh_mask,
                          other=0.0)
        fresh_v = tl.load(value_ptr + rows[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                          mask=fresh_mask, other=0.0)
        k = tl.where(fresh_mask, fresh_k.to(q.dtype), k)
        v = tl.where(fresh_mask, fresh_v.to(q.dtype), v)
        in_seq = in_seq | is_fresh
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 units
    if STREAMING:
        key_pos = tl.load(held_ptr + pos // block_size, mask=in_seq, other=0) * block_size + offset
        if tile < num_sinks:  # the sinks are the first columns (their blocks are never evicted)
            sink_scores = tl.dot(sink_q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            scores = tl.where((key_pos < num_sinks)[None, :], sink_scores, scores)
    if SOFT_CAP > 0:  # tanh(x) = 1 - 2 / (e^2x + 1), e^2x = 2^(2 log2(e) x): no tanh in tl's core ops
        scores = SOFT_CAP * (1.0 - 2.0 / (tl.exp2(scores * (2.0 * 1.4426950408889634 / SOFT_CAP)) + 1.0))
    if STREAMING:
        key_pos = key_pos[None, :]
        visible = (key_pos <= q_pos[:, None]) & ((key_pos < num_sinks) | (key_pos > q_pos[:, None] - stream_window))
        scores = tl.where(visible & in_seq[None, :], scores, float("-inf"))
    elif IS_CAUSAL:
        visible = (pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
    else:
        scores = tl.where(in_seq[None, :], scores, float("-inf"))
    # Without a window every row sees a key in its first tile, so m_new is finite from then on. With one, a row
    # may see nothing in the first tiles: its exponents are then taken from 0 (-inf - -inf would be a NaN).
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_ref = m_new
    if WINDOW > 0 or STREAMING:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend(q, q_pos, start, end, num_keys, block_table_ptr, block_size, kv_head,
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
            stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, qk_scale,
            key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh, fresh_row, use_fresh,
            held_ptr, sink_q, num_sinks, stream_window,
            k_zero_ptr, v_zero_ptr, stride_pb, stride_ph, res_k_ptr, res_v_ptr, stride_rs, stride_rh, tail_column,
            BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
            QUANT: tl.constexpr, FP8_NATIVE: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_CAUSAL: tl.constexpr,
            HAS_FRESH: tl.constexpr, INTERPRET: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
            STREAMING: tl.constexpr):
    """Rows q [M, D] over the key tiles start .. end: (running max, sum, unnormalized output [M, D])."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if INTERPRET:
        # Triton 3.6's interpreter cannot range() over tensor bounds with numpy >= 2.4 (triton#9171).
        tile = start
        while tile < end:
            m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, tile, num_keys, block_table_ptr, block_size,
                                         kv_head, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                                         stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, qk_scale,
                                         key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh, fresh_row,
                                         use_fresh, held_ptr, sink_q, num_sinks, stream_window, k_zero_ptr,
                                         v_zero_ptr, stride_pb, stride_ph, res_k_ptr, res_v_ptr, stride_rs, stride_rh,
                                         tail_column, HEAD_DIM, BLOCK_D,
                                         BLOCK_N, QUANT, FP8_NATIVE, DOT_PRECISION, IS_CAUSAL, HAS_FRESH, WINDOW,
                                         SOFT_CAP, STREAMING)
            tile += BLOCK_N
    else:  # a for loop, which the compiler software-pipelines
        for tile in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, tile, num_keys, block_table_ptr, block_size,
                                         kv_head, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                                         stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, qk_scale,
                                         key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh, fresh_row,
                                         use_fresh, held_ptr, sink_q, num_sinks, stream_window, k_zero_ptr,
                                         v_zero_ptr, stride_pb, stride_ph, res_k_ptr, res_v_ptr, stride_rs, stride_rh,
                                         tail_column, HEAD_DIM, BLOCK_D,
                                         BLOCK_N, QUANT, FP8_NATIVE, DOT_PRECISION, IS_CAUSAL, HAS_FRESH, WINDOW,
                                         SOFT_CAP, STREAMING)
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
                   key_starts_ptr, out_ptr, lse_ptr, qk_scale, num_queries_per_kv, block_size,
                   sink_q_ptr, held_ptr, positions_ptr, num_sinks, stream_window,
                   k_zero_ptr, v_zero_ptr, res_k_ptr, res_v_ptr, tail_columns_ptr, tail_slots_ptr,
                   stride_pb, stride_ph, stride_rb, stride_rs, stride_rh,
                   stride_qb, stride_qh, stride_bt,
                   stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                   stride_ob, stride_oh, stride_op, stride_lb, stride_lh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   PARTITION_SIZE: tl.constexpr, QUANT: tl.constexpr, FP8_NATIVE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr, INTERPRET: tl.constexpr,
                   HAS_STARTS: tl.constexpr, SOFT_CAP: tl.constexpr, STREAMING: tl.constexpr):
    """Program (request, KV head, partition): the KV head's query heads over one slice of the keys.

    The request's keys are its table's columns [0, seq_len), or [key_start, seq_len) with HAS_STARTS (a sliding
    window: the partitions then cover the window only). STREAMING: sinks + window (_attend_tile); seq_len counts
    the table's columns, the query sits at positions[req], its sink query at sink_q_ptr (laid out as q_ptr).
    int4: the request's incomplete block is table column tail_columns[req] (-1: none), its residual slot
    tail_slots[req].
    """
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    start = part * PARTITION_SIZE
    if HAS_STARTS:
        start += tl.load(key_starts_ptr + req)
    if start >= seq_len:  # partitions past this request's end: the merge never reads them
        return
    end = tl.minimum(start + PARTITION_SIZE, seq_len)
    dims = tl.arange(0, BLOCK_D)
    # GQA: the query heads of one KV head are the rows of one tile, padded to BLOCK_G >= 16 for tl.dot.
    group = tl.arange(0, BLOCK_G)
    head = kv_head * num_queries_per_kv + group
    is_head = group < num_queries_per_kv
    q_mask = is_head[:, None] & (dims < HEAD_DIM)[None, :]
    q_rows = req * stride_qb + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_rows, mask=q_mask, other=0.0)
    q_pos = group  # unread without STREAMING
    sink_q = q
    if STREAMING:
        q_pos = tl.zeros([BLOCK_G], tl.int64) + tl.load(positions_ptr + req)
        sink_q = tl.load(sink_q_ptr + q_rows, mask=q_mask, other=0.0)
    residual_row = tl.load(tail_slots_ptr + req) * stride_rb  # int4 only (else never read)
    m_i, l_i, acc = _attend(q, q_pos, start, end, end, block_tables_ptr + req * stride_bt, block_size, kv_head,
                            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                            stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, qk_scale,
                            q_ptr, q_ptr, 0, 0, 0, 0, 0, False,  # no fresh K/V: decode reads the cache only
                            held_ptr + req * stride_bt, sink_q, num_sinks, stream_window,
                            k_zero_ptr, v_zero_ptr, stride_pb, stride_ph, res_k_ptr + residual_row,
                            res_v_ptr + residual_row, stride_rs, stride_rh, tl.load(tail_columns_ptr + req),
                            BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N, QUANT, FP8_NATIVE, DOT_PRECISION, False, False,
                            INTERPRET, 0, SOFT_CAP, STREAMING)
    out = acc / l_i[:, None]
    tl.store(out_ptr + req * stride_ob + head[:, None] * stride_oh + part * stride_op + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if STORE_LSE:
        tl.store(lse_ptr + req * stride_lb + head * stride_lh + part, m_i + tl.log2(l_i), mask=is_head)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, seq_lens_ptr, key_starts_ptr, out_ptr,
                  stride_pb, stride_ph, stride_pp, stride_lb, stride_lh, stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                  PARTITION_SIZE: tl.constexpr, HAS_STARTS: tl.constexpr):
    """Program (request, query head): log-sum-exp weighted sum of the partitions' normalized outputs."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    num_keys = tl.load(seq_lens_ptr + req)
    if HAS_STARTS:
        num_keys -= tl.load(key_starts_ptr + req)
    num_parts = tl.cdiv(num_keys, PARTITION_SIZE)
    parts = tl.arange(0, BLOCK_P)
    dims = tl.arange(0, BLOCK_D)
    is_part = parts < num_parts
    lse = tl.load(lse_ptr + req * stride_lb + head * stride_lh + parts, mask=is_part, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # [P], 0 for missing partitions
    mask = is_part[:, None] & (dims < HEAD_DIM)[None, :]
    partial = tl.load(part_ptr + req * stride_pb + head * stride_ph + parts[:, None] * stride_pp + dims[None, :],
                      mask=mask, other=0.0)  # [P, D]
    out = tl.sum(partial * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + req * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
                    first_keys_ptr, query_start_loc_ptr, out_ptr, key_ptr, value_ptr, qk_scale, num_queries_per_kv,
                    block_size, sink_q_ptr, held_ptr, columns_ptr, num_sinks, stream_window,
                    k_zero_ptr, v_zero_ptr, res_k_ptr, res_v_ptr, tail_columns_ptr, tail_slots_ptr,
                    stride_pb, stride_ph, stride_rb, stride_rs, stride_rh,
                    stride_qt, stride_qh, stride_bt,
                    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, stride_ot, stride_oh,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_N: tl.constexpr, QUANT: tl.constexpr, FP8_NATIVE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, HAS_FRESH: tl.constexpr, INTERPRET: tl.constexpr,
                    WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, STREAMING: tl.constexpr):
    """Program (query tile, sequence, KV head): BLOCK_Q new tokens x the KV head's query heads, causal.

    HAS_FRESH: a sequence with no cached prefix attends over its new K/V rather than their quantized (or rounded)
    copies in the cache, as torch_ref does. WINDOW > 0: a sliding-window layer; query q sees keys
    q - WINDOW < k <= q, and the sequence's table starts at key position first_keys[seq] (column 0). STREAMING:
    sinks + window (_attend_tile) over the table's columns[seq] columns, sink queries at sink_q_ptr (as q_ptr).
    int4: as the decode kernel's, per sequence.
    """
    q_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    first = q_tile * BLOCK_Q  # first query of this tile, counted within the sequence's new tokens
    if first >= query_len:  # the grid covers the longest query; shorter ones stop here
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_cached = seq_len - query_len
    # Rows are (token, query head) pairs: [BLOCK_Q * BLOCK_G], heads of one token adjacent.
    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = first + rows // BLOCK_G
    group = rows % BLOCK_G
    head = kv_head * num_queries_per_kv + group
    is_row = (tok < query_len) & (group < num_queries_per_kv)
    dims = tl.arange(0, BLOCK_D)
    q_mask = is_row[:, None] & (dims < HEAD_DIM)[None, :]
    q_rows = (query_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptr + q_rows + dims[None, :], mask=q_mask, other=0.0)
    sink_q = q
    if STREAMING:
        sink_q = tl.load(sink_q_ptr + q_rows + dims[None, :], mask=q_mask, other=0.0)
    # Query i of the chunk sits at position num_cached + i and sees keys 0 ..= that position; in table columns,
    # counted from the table's first key (0 but for sliding windows).
    first_key = 0
    if WINDOW > 0:
        first_key = tl.load(first_keys_ptr + seq)
    q_pos = num_cached - first_key + tok
    num_keys = tl.minimum(seq_len, num_cached + first + BLOCK_Q) - first_key  # causal: none past the last query
    lowest = 0
    if WINDOW > 0:  # the tile's first query sees no key before this one
        lowest = tl.maximum(num_cached - first_key + first - WINDOW + 1, 0)
    if STREAMING:  # the kept columns up to the last token: the rule is on key positions, not on columns
        num_keys = tl.load(columns_ptr + seq)
    residual_row = tl.load(tail_slots_ptr + seq) * stride_rb  # int4 only (else never read)
    m_i, l_i, acc = _attend(q, q_pos, lowest, num_keys, num_keys, block_tables_ptr + seq * stride_bt, block_size,
                            kv_head, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                            stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, qk_scale,
                            key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh, query_start,
                            num_cached == 0, held_ptr + seq * stride_bt, sink_q, num_sinks, stream_window,
                            k_zero_ptr, v_zero_ptr, stride_pb, stride_ph, res_k_ptr + residual_row,
                            res_v_ptr + residual_row, stride_rs, stride_rh, tl.load(tail_columns_ptr + seq),
                            BLOCK_Q * BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N, QUANT, FP8_NATIVE,
                            DOT_PRECISION, True, HAS_FRESH, INTERPRET, WINDOW, SOFT_CAP, STREAMING)
    if WINDOW > 0 or STREAMING:  # padding rows past the sequence may see no key: 0 / 0, never stored
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_rows = (query_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(out_ptr + o_rows + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------- launchers

# Whether the kernels above were built for TRITON_INTERPRET=1 (decided once, when triton.jit ran).
IS_INTERPRETED = not isinstance(_decode_kernel, triton.runtime.JITFunction)
# Tile sizes. The interpreter pays a fixed Python cost (tens of us) per tl op whatever the tile's
# size, so it gets few, large tiles; the GPU sizes are first guesses, not tuned yet.
_BLOCK_N = 256 if IS_INTERPRETED else 64  # keys per tile (independent of the cache's block_size)
_PREFILL_ROWS = 256 if IS_INTERPRETED else 64  # (query token, query head) rows per prefill program
_WRITE_ELEMENTS = 16384 if IS_INTERPRETED else 4096  # rows * head_dim per write_kv program


@functools.cache
def _use_native_fp8(device: torch.device) -> bool:
    """Hardware e4m3 decode needs sm_89+; the interpreter and older GPUs decode on the bits."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _cache_args(cache: LayerKVCache) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, ...], int]:
    """Scale tensors (the codes themselves when unquantized: never read), strides and QUANT constexpr.

    The scale strides are the per-token scales' (int4: the values'; its keys' per-channel ones are _int4_args').
    """
    quant = _QUANT_MODES[cache.kv_cache_dtype]
    k_scale = cache.key_scale if quant else cache.key
    v_scale = cache.value_scale if quant else cache.value
    strides = (*cache.key.stride()[:3], *v_scale.stride()[:3])  # [N, bs, H, D]: block, slot, head
    if cache.value.stride() != cache.key.stride() or (quant in (1, 2) and v_scale.stride() != k_scale.stride()):
        raise ValueError("key and value caches must share a layout (strides)")
    return k_scale, v_scale, cache.key.shape[1], strides, quant


def _int4_args(cache: LayerKVCache, residual: ResidualColumns | None, stand_in: torch.Tensor) -> tuple:
    """The kernels' int4 arguments: zero points, residual slots, each row's tail column and slot, the keys'
    per-channel parameter strides (block, head) and the residual's (slot, token, head). Stand-ins (never read) for
    other caches; without `residual` no request has a tail."""
    if not cache.is_int4:
        return cache.key, cache.key, cache.key, cache.key, stand_in, stand_in, 0, 0, 0, 0, 0
    if residual is None:
        residual = ResidualColumns(torch.full_like(stand_in, -1, dtype=torch.int32),
                                   torch.zeros_like(stand_in, dtype=torch.int32))
    keys, values = cache.residual_key, cache.residual_value
    if cache.key_zero.stride() != cache.key_scale.stride() or cache.value_zero.stride() != \
            cache.value_scale.stride() or values.stride() != keys.stride():
        raise ValueError("an int4 cache's scales and zero points, and its residual keys and values, must share "
                         "their layouts (strides)")
    return (cache.key_zero, cache.value_zero, keys, values, residual.columns, residual.slots,
            cache.key_scale.stride(0), cache.key_scale.stride(2), *keys.stride()[:3])


@dataclass
class SinksWindowRows:
    """Attention sinks + window (kv/window_layout.py's WindowMetadata) for the kernels, one row per request."""

    num_sinks: int
    window: int
    sink_query: torch.Tensor  # [T, Hq, D], laid out as the query: each token's query rotated for the sinks
    held_columns: torch.Tensor  # [R, max_blocks] int32, laid out as the block table: each column's logical block
    num_keys: torch.Tensor  # [R] int32: the kept blocks' slots up to the request's last token
    positions: torch.Tensor  # [R] long: a decode's query position (prefills: unread)

    def rows(self, requests: slice, tokens: slice) -> SinksWindowRows:
        """These requests' rows and these tokens' sink queries."""
        return SinksWindowRows(self.num_sinks, self.window, self.sink_query[tokens], self.held_columns[requests],
                               self.num_keys[requests], self.positions[requests])


def _streaming_args(rows: SinksWindowRows | None, query: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """The kernels' (sink queries, held columns, positions, key counts, num_sinks, window); stand-ins never read
    without sinks + window."""
    if rows is None:
        return query, block_tables, lengths, lengths, 0, 0
    held_rows, row_stride = rows.held_columns.shape[0], rows.held_columns.stride(0)
    if not _same_layout(rows.sink_query, query) or (held_rows > 1 and row_stride != block_tables.stride(0)):
        raise ValueError("sink queries and held columns must be laid out as the queries and the block table")
    return rows.sink_query, rows.held_columns, rows.positions, rows.num_keys, rows.num_sinks, rows.window


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernels may index `a` with `b`'s strides: the same shape and strides (those of size-1 dims are
    never used)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n > 1)


def _log2_cap(soft_cap: float | None) -> float:
    """The kernels' SOFT_CAP: the cap in the log2 units their scores are in, 0.0 for none."""
    return 0.0 if soft_cap is None else soft_cap * _LOG2E


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 stays float32 in tl.dot (TF32 would miss the 1e-4 oracle tolerance)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def write_kv(key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
    """Store keys/values [T, Hkv, D] at their slots (negative = skip), quantizing for int8/fp8 caches."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if cache.is_int4:
        raise ValueError("an int4 cache is written block by block from its residual (torch_ref.write_kv_int4)")
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    k_scale, v_scale, block_size, strides, quant = _cache_args(cache)
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, _WRITE_ELEMENTS // block_d)
    num_rows = num_tokens * num_kv_heads
    _write_kv_kernel[(triton.cdiv(num_rows, block_r),)](
        key, value, slot_mapping, cache.key, cache.value, k_scale, v_scale,
        num_rows, num_kv_heads, block_size,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), *strides,
        HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d, QUANT=quant)


def partitioning(table_tokens: int, partition_size: int) -> tuple[int, int]:
    """(keys per partition, partitions) of the split-KV grid for block tables `table_tokens` keys wide.

    The table's width (max_model_len under CUDA graphs) bounds every seq_len without a host sync, so the grid is
    sized by it; `partition_size` doubles until at most MAX_PARTITIONS cover it. Uncapped, a 40,960-token table
    would launch 80 programs per row and KV head, nearly all of them empty for short requests.
    """
    while triton.cdiv(table_tokens, partition_size) > MAX_PARTITIONS:
        partition_size *= 2
    return partition_size, triton.cdiv(table_tokens, partition_size)


def decode_attention(query: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                     partition_size: int = DEFAULT_PARTITION_SIZE,
                     key_starts: torch.Tensor | None = None, soft_cap: float | None = None,
                     sinks_window: SinksWindowRows | None = None,
                     residual: ResidualColumns | None = None) -> torch.Tensor:
    """One query token per request: query [B, Hq, D], tables [B, max_blocks], seq_lens [B] -> [B, Hq, D].

    Split-KV (Flash-Decoding): the keys of a request are cut into partitions of `partition_size`
    that run in parallel, and a second kernel merges them by log-sum-exp. One program serves all
    Hq / Hkv query heads of a KV head, so each K/V tile is read once per group (GQA).
    key_starts [B] (a sliding window): each request attends to its table's columns [key_starts, seq_lens) only.
    soft_cap: scaled scores become soft_cap * tanh(scores / soft_cap) before the softmax (Gemma 2).
    sinks_window: attention sinks + window; seq_lens then count each table's kept keys (sinks_window.num_keys).
    residual (an int4 cache): each request's incomplete block, read from its residual slot.
    """
    batch, num_heads, head_dim = query.shape
    out = torch.empty_like(query) if out is None else out
    if batch == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    if partition_size % _BLOCK_N:
        raise ValueError(f"partition_size must be a multiple of {_BLOCK_N}, got {partition_size}")
    k_scale, v_scale, block_size, strides, quant = _cache_args(cache)
    num_kv_heads = cache.key.shape[2]
    group = num_heads // num_kv_heads
    partition_size, num_parts = partitioning(block_tables.shape[1] * block_size, partition_size)
    block_d = triton.next_power_of_2(head_dim)
    if num_parts == 1:  # one partition: write the final output directly, no merge
        partial, lse = out, out
        partial_strides = (out.stride(0), out.stride(1), 0)
    else:
        partial = torch.empty(batch, num_heads, num_parts, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(batch, num_heads, num_parts, dtype=torch.float32, device=query.device)
        partial_strides = partial.stride()[:3]
    has_starts = key_starts is not None
    key_starts = key_starts if has_starts else seq_lens  # never read without a window
    sink_query, held, positions, _, num_sinks, window = _streaming_args(sinks_window, query, block_tables, seq_lens)
    _decode_kernel[(batch, num_kv_heads, num_parts)](
        query, cache.key, cache.value, k_scale, v_scale, block_tables, seq_lens, key_starts, partial, lse,
        scale * _LOG2E, group, block_size, sink_query, held, positions, num_sinks, window,
        *_int4_args(cache, residual, seq_lens),
        query.stride(0), query.stride(1), block_tables.stride(0), *strides,
        *partial_strides, lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=_BLOCK_N,
        PARTITION_SIZE=partition_size, QUANT=quant, FP8_NATIVE=_use_native_fp8(query.device),
        DOT_PRECISION=_dot_precision(query.dtype), STORE_LSE=num_parts > 1, INTERPRET=IS_INTERPRETED,
        HAS_STARTS=has_starts, SOFT_CAP=_log2_cap(soft_cap), STREAMING=sinks_window is not None, num_warps=4)
    if num_parts > 1:
        _merge_kernel[(batch, num_heads)](
            partial, lse, seq_lens, key_starts, out, *partial.stride()[:3], lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=triton.next_power_of_2(num_parts),
            PARTITION_SIZE=partition_size, HAS_STARTS=has_starts, num_warps=4)
    return out


def prefill_attention(query: torch.Tensor, cache: LayerKVCache, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int, scale: float,
                      out: torch.Tensor | None = None, key: torch.Tensor | None = None,
                      value: torch.Tensor | None = None, first_keys: torch.Tensor | None = None,
                      window: int = 0, soft_cap: float | None = None,
                      sinks_window: SinksWindowRows | None = None,
                      residual: ResidualColumns | None = None) -> torch.Tensor:
    """Causal varlen attention over the paged cache, all sequences in one launch.

    query [T, Hq, D] packs each sequence's new tokens at query_start_loc [S + 1]; seq_lens [S]
    count cached prefix + new tokens; block_tables [S, max_blocks]. The new keys must already be
    in the cache (write_kv first). Rows of `out` outside the sequences are left untouched.
    key/value [T, Hkv, D] (optional, quantized caches): a sequence without a cached prefix then
    attends over these full-precision rows instead of their quantized copies, like torch_ref.
    window > 0 (a sliding-window layer): query q sees keys q - window < k <= q, and each table row starts at key
    position first_keys [S] (the blocks before it are gone). soft_cap: as decode_attention's. sinks_window:
    attention sinks + window (StreamingLLM), each table holding the kept blocks. residual: as decode_attention's.
    Not measured yet: on GPU, compare with SDPA / FlashAttention over gathered K/V.
    """
    _, num_heads, head_dim = query.shape
    out = torch.empty_like(query) if out is None else out
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    k_scale, v_scale, block_size, strides, quant = _cache_args(cache)
    num_kv_heads = cache.key.shape[2]
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_q = max(1, _PREFILL_ROWS // block_g)  # tokens per program; rows = block_q * block_g >= 16
    block_d = triton.next_power_of_2(head_dim)
    # A lossy cache (quantized, or 16-bit under a float32 model): a prompt with nothing cached reads its fresh K/V.
    has_fresh = key is not None and value is not None and (quant != 0 or cache.key.dtype != key.dtype)
    if not has_fresh:
        key = value = query  # never read
    elif key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    if window <= 0 or first_keys is None:
        window, first_keys = 0, seq_lens  # never read
    sink_query, held, _, num_keys, num_sinks, stream_window = _streaming_args(sinks_window, query, block_tables,
                                                                              seq_lens)
    _prefill_kernel[grid](
        query, cache.key, cache.value, k_scale, v_scale, block_tables, seq_lens, first_keys, query_start_loc, out,
        key, value,
        scale * _LOG2E, group, block_size, sink_query, held, num_keys, num_sinks, stream_window,
        *_int4_args(cache, residual, seq_lens),
        query.stride(0), query.stride(1), block_tables.stride(0), *strides, out.stride(0), out.stride(1),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_N=_BLOCK_N,
        QUANT=quant, FP8_NATIVE=_use_native_fp8(query.device), DOT_PRECISION=_dot_precision(query.dtype),
        HAS_FRESH=has_fresh, INTERPRET=IS_INTERPRETED, WINDOW=window, SOFT_CAP=_log2_cap(soft_cap),
        STREAMING=sinks_window is not None, num_warps=4 if block_d <= 64 else 8)
    return out


# ---------------------------------------------------------------------------- the backend


@dataclass
class TritonAttentionMetadata:
    """What the kernels read, derived once per step from the common metadata and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] long
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long (a view: row stride = the common table's)
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    query_start_loc: torch.Tensor  # [num_prefills + 1] int32, absolute rows in the packed batch
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] long (a view)
    max_query_len: int  # of the prefills; 0 when there are none
    prefills: list[PrefillSeq] = dataclasses.field(default_factory=list)  # MLA only: each prefill's latent inputs
    # A sliding-window KV group: the window, each decode's first visible column (decode_seq_lens are then its
    # table's last column + 1) and each prefill's first key position (its table's column 0).
    sliding_window: int = 0
    decode_key_starts: torch.Tensor | None = None  # [num_decodes] int32
    prefill_first_keys: torch.Tensor | None = None  # [num_prefills] int32
    # Attention sinks + window: the kept blocks' columns (every request's row) and the sink queries' rotation.
    sinks_window: SinksWindowRows | None = None
    sink_rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) [T, 1, D]
    # An int4 cache: the step's write plan, and the decodes' and prefills' incomplete blocks.
    int4: Int4WritePlan | None = None
    decode_residual: ResidualColumns | None = None
    prefill_residual: ResidualColumns | None = None


class TritonAttentionBackend(AttentionBackend, MLABackend):
    """Split-KV decode and varlen prefill kernels over plain, int8, fp8 and int4 caches, sliding-window layers,
    attention sinks + window and logit soft caps included; MLA's latent write and absorbed decode in triton_mla.py,
    its prefills' latents gathered with torch. An int4 cache's blocks are quantized by torch ops as they complete
    (torch_ref.write_kv_int4)."""

    name = "triton"
    devices = ("cuda",)
    kv_cache_dtypes = frozenset({"float32", "float16", "bfloat16", *_QUANT_MODES} - {"auto"})
    supports_window = True
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supports_mla = True
    supports_cuda_graphs = True  # the decode grid comes from the table's width, never from seq_lens on the host

    def __init__(self, needs: AttentionRequirements) -> None:
        self.check_supported(needs)
        self.use_mla = needs.use_mla
        self.logits_soft_cap = needs.logits_soft_cap

    @classmethod
    def check_supported(cls, needs: AttentionRequirements) -> None:
        """The declared support; on the CPU only under Triton's interpreter (the tests)."""
        if needs.device.type == "cpu" and IS_INTERPRETED:
            needs = dataclasses.replace(needs, device=torch.device("cuda"))
        elif needs.device.type != "cuda":
            raise ValueError(f"attention_backend='triton' on {needs.device.type} needs TRITON_INTERPRET=1 "
                             "(Triton's CPU interpreter) set before triton is first imported")
        super().check_supported(needs)

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        """int32 lengths and offsets, and views of the padded table cut to the decodes' and prefills' widths."""
        num_decodes = common.num_decode_tokens
        seq_lens = common.seq_lens.to(torch.int32)
        num_blocks = common.num_blocks_host
        # The kernels take the row stride, so column slices of the common table are read in place.
        decode_width = max(num_blocks[:num_decodes], default=0)
        prefill_width = max(num_blocks[num_decodes:], default=1)
        has_prefills = common.num_reqs > num_decodes
        metadata = TritonAttentionMetadata(
            slot_mapping=common.slot_mapping, num_decodes=num_decodes,
            decode_block_tables=common.block_table[:num_decodes, :decode_width],
            decode_seq_lens=seq_lens[:num_decodes],
            query_start_loc=common.query_start_loc[num_decodes:].to(torch.int32),
            prefill_seq_lens=seq_lens[num_decodes:],
            prefill_block_tables=common.block_table[num_decodes:, :prefill_width],
            max_query_len=common.max_query_len if has_prefills else 0,
            prefills=[prefill_seq(common, row) for row in range(num_decodes, common.num_reqs)] if self.use_mla else [])
        if common.sliding_window is not None:
            starts, ends = sliding_key_ranges(common)
            metadata.sliding_window = common.sliding_window
            metadata.decode_key_starts, metadata.decode_seq_lens = starts.to(torch.int32), ends.to(torch.int32)
            metadata.prefill_first_keys = common.first_key_position[num_decodes:].to(torch.int32)
        if common.window is not None:
            metadata.sinks_window, metadata.sink_rotation = _sinks_window_rows(common), common.window.sink_rotation
        if common.int4 is not None:
            device = common.block_table.device
            metadata.int4 = common.int4
            metadata.decode_residual = ResidualColumns.of(common.int4.decode_tails, num_decodes, device)
            metadata.prefill_residual = ResidualColumns.of(_numbered(common.int4.prefill_tails, device),
                                                           common.num_reqs - num_decodes, device)
        return metadata

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                metadata: TritonAttentionMetadata, scale: float) -> torch.Tensor:
        """Write K/V, then the decode and prefill kernels: query [T, Hq, D] -> [T, Hq, D]."""
        if metadata.int4 is not None:
            torch_ref.write_kv_int4(key, value, cache, metadata.int4)
        else:
            write_kv(key, value, cache, metadata.slot_mapping)
        output = torch.empty_like(query)
        num_decodes = metadata.num_decodes
        decode_rows = prefill_rows = None
        decode_lens = metadata.decode_seq_lens
        if metadata.sinks_window is not None:
            query = query.contiguous()  # the sink queries' layout
            rows = dataclasses.replace(metadata.sinks_window, sink_query=torch_ref.rotate_heads(
                query, metadata.sink_rotation, slice(0, query.shape[0])).contiguous())
            decode_rows = rows.rows(slice(0, num_decodes), slice(0, num_decodes))
            prefill_rows = rows.rows(slice(num_decodes, None), slice(None))
            decode_lens = decode_rows.num_keys
        if num_decodes:
            decode_attention(query[:num_decodes], cache, metadata.decode_block_tables, decode_lens,
                             scale, out=output[:num_decodes], key_starts=metadata.decode_key_starts,
                             soft_cap=self.logits_soft_cap, sinks_window=decode_rows,
                             residual=metadata.decode_residual)
        if metadata.max_query_len:
            prefill_attention(query, cache, metadata.query_start_loc, metadata.prefill_seq_lens,
                              metadata.prefill_block_tables, metadata.max_query_len, scale, out=output, key=key,
                              value=value, first_keys=metadata.prefill_first_keys, window=metadata.sliding_window,
                              soft_cap=self.logits_soft_cap, sinks_window=prefill_rows,
                              residual=metadata.prefill_residual)
        return output

    def write_latent(self, latent: torch.Tensor, cache: LayerKVCache, metadata: TritonAttentionMetadata) -> None:
        """MLA: store this step's latents [T, d_c + d_r] at their slots."""
        from kvserve.attention import triton_mla

        triton_mla.write_latent(latent, cache, metadata.slot_mapping)

    def prefill_latents(self, latent: torch.Tensor, cache: LayerKVCache,
                        metadata: TritonAttentionMetadata) -> list[tuple[slice, torch.Tensor]]:
        """MLA: per prefill, (its rows, its latents [S, D]: the cached prefix read back, then this step's)."""
        return [(slice(seq.query_start, seq.query_start + seq.query_len),
                 mla.prefill_latents(latent[seq.query_start:seq.query_start + seq.query_len], cache, seq))
                for seq in metadata.prefills]

    def absorbed_decode(self, query: torch.Tensor, cache: LayerKVCache, metadata: TritonAttentionMetadata,
                        kv_lora_rank: int, scale: float) -> torch.Tensor:
        """MLA: latent queries [B, H, d_c + d_r] -> attention-weighted latents [B, H, d_c]."""
        from kvserve.attention import triton_mla

        return triton_mla.absorbed_decode(query, cache, metadata.decode_block_tables, metadata.decode_seq_lens,
                                          kv_lora_rank, scale)


def _numbered(tails: list[ResidualTails | None], device: torch.device) -> ResidualTails:
    """The prefills' tails (each request's own, row 0 of one) as one ResidualTails over the prefills' rows."""
    present = [(row, tail) for row, tail in enumerate(tails) if tail is not None]
    if not present:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return ResidualTails(empty, empty, empty)
    rows = torch.tensor([row for row, _ in present], dtype=torch.long, device=device)
    return ResidualTails(rows, torch.cat([tail.blocks for _, tail in present]),
                         torch.cat([tail.slots for _, tail in present]))


def _sinks_window_rows(common: CommonAttentionMetadata) -> SinksWindowRows:
    """The window's held block columns as a tensor laid out as the block table, each request's kept keys (up to its
    last token), and each request's first query position (a decode's only one). The sink queries are filled in per
    layer (forward)."""
    window, table = common.window, common.block_table
    held = torch.zeros(table.shape, dtype=torch.int32)
    for row, columns in enumerate(window.held_columns):
        held[row, :len(columns)] = torch.tensor(columns, dtype=torch.int32)
    # Columns up to the sequence's last token: the last kept block's later slots are unwritten (stale, maybe NaN).
    size = common.block_size
    num_keys = torch.tensor([(len(columns) - 1) * size + (length - 1) % size + 1
                             for columns, length in zip(window.held_columns, common.seq_lens_host, strict=True)],
                            dtype=torch.int32)
    device = table.device
    return SinksWindowRows(window.num_sinks, window.window, table.new_empty(0), held.to(device), num_keys.to(device),
                           common.positions[common.query_start_loc[:-1]])
