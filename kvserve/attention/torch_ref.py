"""Pure-torch paged attention: the CPU path and the oracle every faster backend is tested against."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvserve.attention.torch_metadata import PrefillSeq, TorchAttentionMetadata
from kvserve.kv.int4_residual import Int4WritePlan, ResidualTails
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.kv.kv_quant import codes_as, dequantize, dequantize_int4, quantize, quantize_int4
from kvserve.kv.window_layout import WindowMetadata

# (query [B, Hq, D], cache, metadata, scale) -> [B, Hq, D]: attention of the step's single-token queries.
DecodeAttention = Callable[[torch.Tensor, LayerKVCache, TorchAttentionMetadata, float], torch.Tensor]

# Quantized caches are attended this many tokens at a time, so only one segment is ever dequantized
# (fewer, larger segments: each one costs a few small ops per layer).
DEQUANT_SEGMENT_TOKENS = 1024


def write_kv(key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values [T, Hkv, D] at their slots, quantizing on the way in if the cache is, or
    rounding to its dtype (a float16 / bfloat16 cache of a float32 model)."""
    if cache.is_quantized:
        key, key_scale = quantize(key, cache.kv_cache_dtype)
        _flat(cache.key_scale).index_copy_(0, slot_mapping, key_scale)
        if value.shape[-1]:  # MLA caches no separate value (value_dim 0): nothing to scale
            value, value_scale = quantize(value, cache.kv_cache_dtype)
            _flat(cache.value_scale).index_copy_(0, slot_mapping, value_scale)
    else:
        key, value = key.to(cache.key.dtype), value.to(cache.value.dtype)
    _flat(cache.key).index_copy_(0, slot_mapping, key)
    if value.shape[-1]:
        _flat(cache.value).index_copy_(0, slot_mapping, value)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, H, D] -> [num_slots, H, D] (a view)."""
    # Explicit sizes, not -1: an MLA value cache has D == 0, and -1 is ambiguous for an empty tensor.
    return cache.view(cache.shape[0] * cache.shape[1], cache.shape[2], cache.shape[3])


def gather_kv(cache: LayerKVCache, block_tables: torch.Tensor, dtype: torch.dtype,
              tails: ResidualTails | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read whole blocks, dequantized block by block (or widened: a 16-bit cache of a float32 model): tables [B, nb]
    -> keys, values [B, H, nb * bs, D] in `dtype`.

    int4: the incomplete tail blocks named by `tails` are read from the full-precision residual instead.
    """
    if cache.is_int4:
        return _gather_int4(cache, block_tables, dtype, tails)
    keys, values = _gather(cache.key, block_tables), _gather(cache.value, block_tables)
    if cache.is_quantized:
        keys = dequantize(keys, _gather(cache.key_scale, block_tables), dtype)
        if values.shape[-1]:
            values = dequantize(values, _gather(cache.value_scale, block_tables), dtype)
    elif keys.dtype != dtype:
        keys, values = keys.to(dtype), values.to(dtype)
    return keys, values


def _gather_int4(cache: LayerKVCache, tables: torch.Tensor, dtype: torch.dtype,
                 tails: ResidualTails | None) -> tuple[torch.Tensor, torch.Tensor]:
    # [B, nb, bs, H, D / 2] codes; key parameters [B, nb, 1, H, D] broadcast over a block's tokens.
    keys = dequantize_int4(_blocks(cache.key, tables), _blocks(cache.key_scale, tables),
                           _blocks(cache.key_zero, tables), dtype)
    values = dequantize_int4(_blocks(cache.value, tables), _blocks(cache.value_scale, tables),
                             _blocks(cache.value_zero, tables), dtype)
    if tails is not None and tails.rows.numel():
        keys[tails.rows, tails.blocks] = cache.residual_key[tails.slots]  # [k, bs, H, D]
        values[tails.rows, tails.blocks] = cache.residual_value[tails.slots]
    batch, num_blocks, block_size, heads, _ = keys.shape
    return (keys.view(batch, num_blocks * block_size, heads, -1).transpose(1, 2),
            values.view(batch, num_blocks * block_size, heads, -1).transpose(1, 2))


def write_kv_int4(key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, plan: Int4WritePlan) -> None:
    """Quantize the blocks completed this step (keys per channel, values per token); keep the rest exact."""
    if plan.flush_blocks.numel():
        blocks = plan.flush_blocks
        for new, residual, codes, scale, zero, dim in (
                (key, cache.residual_key, cache.key, cache.key_scale, cache.key_zero, 1),
                (value, cache.residual_value, cache.value, cache.value_scale, cache.value_zero, -1)):
            full = _assemble_blocks(new, residual, plan)  # [C, bs, H, D]
            block_codes, block_scale, block_zero = quantize_int4(full, dim)
            codes.index_copy_(0, blocks, block_codes)
            scale.index_copy_(0, blocks, block_scale)
            zero.index_copy_(0, blocks, block_zero)
    if plan.residual_rows.numel():
        _flat(cache.residual_key).index_copy_(0, plan.residual_slots, key[plan.residual_rows])
        _flat(cache.residual_value).index_copy_(0, plan.residual_slots, value[plan.residual_rows])


def _assemble_blocks(new: torch.Tensor, residual: torch.Tensor, plan: Int4WritePlan) -> torch.Tensor:
    """The completed blocks' tokens, from the residual (earlier steps) and this step: [C, bs, H, D]."""
    block_size = residual.shape[1]
    full = new.new_empty(plan.flush_blocks.numel() * block_size, *new.shape[1:])
    rows, slots = plan.flush_from_residual
    full[rows] = _flat(residual)[slots].to(new.dtype)
    rows, step_rows = plan.flush_from_step
    full[rows] = new[step_rows]
    return full.view(-1, block_size, *new.shape[1:])


def _blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [N, ...], tables [B, nb] -> the tables' blocks [B, nb, ...] (a copy)."""
    # index_select over the flat block dimension copies whole blocks; `cache[block_tables]` ran ~5x slower.
    return cache.index_select(0, block_tables.flatten()).view(*block_tables.shape, *cache.shape[1:])


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, H, D], tables [B, nb] -> [B, H, nb * bs, D]."""
    batch, num_blocks = block_tables.shape
    blocks = _blocks(cache, block_tables)  # [B, nb, bs, H, D]
    return blocks.view(batch, num_blocks * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                    metadata: TorchAttentionMetadata, scale: float,
                    decode: DecodeAttention | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """Write K/V to the cache, then attend: query [T, Hq, D] -> output [T, Hq, D].

    `decode` replaces this module's batched single-token attention (a compiled backend's kernel). `soft_cap`:
    scaled scores become soft_cap * tanh(scores / soft_cap) before the mask and softmax (Gemma 2).
    """
    if cache.is_int4:
        write_kv_int4(key, value, cache, metadata.int4)
    else:
        write_kv(key, value, cache, metadata.slot_mapping)
    output = torch.empty_like(query)
    window = metadata.window
    if metadata.num_decodes:
        queries = query[:metadata.num_decodes]
        output[:metadata.num_decodes] = (decode(queries, cache, metadata, scale) if decode is not None
                                         else _decode(queries, cache, metadata, scale, soft_cap))
    for seq in metadata.prefills:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        if window is None:
            output[rows] = _prefill(query[rows], key[rows], value[rows], cache, seq, scale, soft_cap)
        else:
            output[rows] = _prefill_with_window(query[rows], key[rows], value[rows], cache, seq, scale, window, rows)
    return output


def rotate_heads(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor],
                 rows: slice | torch.Tensor) -> torch.Tensor:
    """Rotate heads x [n, H, D] by the RoPE angles of `rows` (rotate-half layout)."""
    cos, sin = rotation[0][rows], rotation[1][rows]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _decode(query: torch.Tensor, cache: LayerKVCache, metadata: TorchAttentionMetadata, scale: float,
            soft_cap: float | None = None) -> torch.Tensor:
    """One query token per request, all requests in one batched call."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = cache.key.shape[2]
    tails = metadata.int4.decode_tails if cache.is_int4 else None
    # GQA without copying K/V per query head: the query heads sharing a KV head become that
    # head's "query length". [B, Hq, D] -> [B, Hkv, G, D]
    grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    window = metadata.window
    if cache.is_quantized:
        # Every row may use the sink query: for rows with delta = 0 it is the query itself (cos 1, sin 0).
        sinks = rotate_heads(query, window.sink_rotation, slice(0, batch)).view(grouped.shape) if window else None
        out = _attend_quantized(grouped, sinks, cache, metadata.decode_block_tables, metadata.decode_mask, tails,
                                window.num_sinks if window else 0, scale, soft_cap)
        return out.reshape(batch, num_heads, -1)
    keys, values = gather_kv(cache, metadata.decode_block_tables, query.dtype, tails)  # [B, Hkv, L, D]
    if soft_cap is not None:
        return _capped_attention(grouped, keys, values, metadata.decode_mask, scale, soft_cap).reshape(
            batch, num_heads, -1)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=metadata.decode_mask,
                                         scale=scale)  # [B, Hkv, G, D]
    if window is not None and window.decode_in_window.any():
        # Queries past sinks + window score the sinks from a shifted position; the others were plain causal.
        rows = window.decode_in_window.nonzero().flatten()
        sinks = rotate_heads(query[rows], window.sink_rotation, rows).view(-1, *grouped.shape[1:])
        out[rows] = _window_attention(grouped[rows], sinks, keys[rows], values[rows], metadata.decode_mask[rows],
                                      window.num_sinks, scale)
    return out.reshape(batch, num_heads, -1)


def _prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, seq: PrefillSeq,
             scale: float, soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of one request's new tokens over its cached prefix and themselves."""
    num_cached = seq.seq_len - seq.query_len
    if num_cached == 0 and seq.key_mask is None:
        # Nothing cached before: the fresh K/V are the whole sequence. [n, H, D] -> [H, n, D]
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
        mask = None
    else:
        # Query i sits at position num_cached + i and sees keys 0..num_cached + i (a sliding window: key_mask).
        mask = seq.key_mask
        if mask is None:
            key_pos = torch.arange(seq.block_table.numel() * cache.key.shape[1], device=query.device)
            query_pos = torch.arange(num_cached, seq.seq_len, device=query.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [n, nb * bs]
        if cache.is_quantized:
            return _prefill_quantized(query, None, cache, seq, mask, 0, scale, soft_cap)
        keys, values = gather_kv(cache, seq.block_table[None], query.dtype, seq.residual)
        num_keys = seq.seq_len - seq.first_key  # the gathered keys up to the last query
        keys, values = keys[0, :, :num_keys], values[0, :, :num_keys]  # [Hkv, S, D]
        mask = mask[:, :num_keys]
    group = query.shape[1] // keys.shape[0]
    if group > 1:  # GQA: one K/V copy per query head; SDPA's own enable_gqa falls back to a slow kernel
        keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
    if soft_cap is not None:
        if mask is None:
            mask = torch.ones(query.shape[0], keys.shape[1], dtype=torch.bool, device=query.device).tril()
        return _capped_attention(query.transpose(0, 1), keys, values, mask, scale, soft_cap).transpose(0, 1)
    # A batch dimension of 1: CPU SDPA takes its fused flash kernel only for 4-D inputs (3-4x faster).
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                         is_causal=mask is None, scale=scale)
    return out[0].transpose(0, 1)  # [n, Hq, D]


def _prefill_with_window(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                         seq: PrefillSeq, scale: float, window: WindowMetadata, rows: slice) -> torch.Tensor:
    """A prompt chunk under sinks + window: queries before S + W are plain causal, later ones see sinks + window."""
    num_cached = seq.seq_len - seq.query_len
    num_plain = min(max(window.num_sinks + window.window - num_cached, 0), seq.query_len)
    # A lossy cache and nothing cached before: every row reads this chunk's fresh K/V, as a prompt without a window
    # does (nothing is evicted yet, so key columns are positions).
    fresh = num_cached == 0 and (cache.is_quantized or cache.key.dtype != key.dtype)
    if num_plain == seq.query_len:
        return _prefill(query, key, value, cache, dataclasses.replace(seq, key_mask=None) if fresh else seq, scale)
    out = torch.empty_like(query)
    if num_plain:  # nothing is evicted while some query still sees everything before it
        head = PrefillSeq(seq.query_start, num_plain, num_cached + num_plain, seq.block_table, seq.residual)
        out[:num_plain] = _prefill(query[:num_plain], key[:num_plain], value[:num_plain], cache, head, scale)
    num_tokens, num_heads, head_dim = query.shape
    late = slice(num_plain, num_tokens)
    sink_query = rotate_heads(query[late], window.sink_rotation, slice(rows.start + num_plain, rows.stop))
    mask = seq.key_mask[late]
    if fresh:  # [n, Hkv, D] -> [1, Hkv, n, D]
        keys, values, mask = key.transpose(0, 1)[None], value.transpose(0, 1)[None], mask[:, :num_tokens]
    elif cache.is_quantized:
        out[late] = _prefill_quantized(query[late], sink_query, cache, seq, mask, window.num_sinks, scale)
        return out
    else:
        keys, values = gather_kv(cache, seq.block_table[None], query.dtype, seq.residual)  # [1, Hkv, L, D]
    num_kv_heads = keys.shape[1]

    def by_kv_head(x: torch.Tensor) -> torch.Tensor:  # [n, Hq, D] -> [Hkv, G, n, D]
        return x.reshape(x.shape[0], num_kv_heads, -1, head_dim).permute(1, 2, 0, 3)

    out_late = _window_attention(by_kv_head(query[late]), by_kv_head(sink_query), keys[0, :, None],
                                 values[0, :, None], mask, window.num_sinks, scale)
    out[late] = out_late.permute(2, 0, 1, 3).reshape(-1, num_heads, head_dim)  # [Hkv, G, n, D] -> [n, Hq, D]
    return out


def _prefill_quantized(query: torch.Tensor, sink_query: torch.Tensor | None, cache: LayerKVCache,
                       seq: PrefillSeq, mask: torch.Tensor, num_sinks: int, scale: float,
                       soft_cap: float | None = None) -> torch.Tensor:
    """Queries [n, Hq, D] of one request over its quantized cache, with the key mask [n, nb * bs] -> [n, Hq, Dv]."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = cache.key.shape[2]
    group = num_heads // num_kv_heads

    def by_kv_head(x: torch.Tensor) -> torch.Tensor:  # [n, Hq, D] -> [1, Hkv, n * G, D], rows ordered (n, G)
        return x.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(0, 1).reshape(
            1, num_kv_heads, num_tokens * group, head_dim)

    sinks = by_kv_head(sink_query) if sink_query is not None else None
    row_mask = mask.repeat_interleave(group, dim=0)[None, None]  # [1, 1, n * G, nb * bs]
    out = _attend_quantized(by_kv_head(query), sinks, cache, seq.block_table[None], row_mask, seq.residual,
                            num_sinks, scale, soft_cap)  # [1, Hkv, n * G, Dv]
    return out[0].reshape(num_kv_heads, num_tokens, group, -1).transpose(0, 1).reshape(num_tokens, num_heads, -1)


def _attend_quantized(query: torch.Tensor, sink_query: torch.Tensor | None, cache: LayerKVCache,
                      tables: torch.Tensor, mask: torch.Tensor, tails: ResidualTails | None, num_sinks: int,
                      scale: float, soft_cap: float | None = None) -> torch.Tensor:
    """Online-softmax attention over a quantized cache, dequantizing DEQUANT_SEGMENT_TOKENS tokens at a time.

    No full-precision copy of the whole history is ever built: only one segment's K/V at once.
    query / sink_query [B, Hkv, M, D], tables [B, nb], mask [B, 1, M, nb * bs] bool -> [B, Hkv, M, Dv].
    The first `num_sinks` key columns (sinks, always in the first segment) are scored with `sink_query`.
    """
    block_size = cache.key.shape[1]
    segment_blocks = max(DEQUANT_SEGMENT_TOKENS // block_size, 1)
    running_max = torch.full((*query.shape[:-1], 1), float("-inf"), dtype=query.dtype, device=query.device)
    denominator = torch.zeros_like(running_max)
    numerator = None
    for first in range(0, tables.shape[1], segment_blocks):
        segment = tables[:, first:first + segment_blocks]
        keys, values, key_scale, value_scale = _read_segment(cache, segment, query.dtype,
                                                             _tails_within(tails, first, segment.shape[1]))
        scores = query @ keys.transpose(-1, -2)  # [B, Hkv, M, S]
        if sink_query is not None and first == 0 and num_sinks:
            scores[..., :num_sinks] = sink_query @ keys[..., :num_sinks, :].transpose(-1, -2)
        if key_scale is not None:
            scores = scores * key_scale
        columns = slice(first * block_size, (first + segment.shape[1]) * block_size)
        scores = _soft_capped(scores * scale, soft_cap).masked_fill_(~mask[..., columns], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # all masked so far: 0
        weights = torch.exp(scores - shift)
        rescale = torch.exp(running_max - shift)
        denominator = denominator * rescale + weights.sum(dim=-1, keepdim=True)
        partial = (weights if value_scale is None else weights * value_scale) @ values
        numerator = partial if numerator is None else numerator * rescale + partial
        running_max = new_max
    return numerator / denominator


def _read_segment(cache: LayerKVCache, tables: torch.Tensor, dtype: torch.dtype, tails: ResidualTails | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """keys, values [B, H, S, D] of some blocks, and their per-token scales [B, H, 1, S] still to apply.

    int8 / fp8 scales are per token, so q . (codes * s) = (q . codes) * s: they multiply the scores and the
    softmax weights ([B, H, M, S]) instead of every cached element. int4 comes back fully dequantized (None).
    """
    if cache.is_int4:
        return (*gather_kv(cache, tables, dtype, tails), None, None)
    keys, values = _codes_by_head(cache.key, tables, dtype), _codes_by_head(cache.value, tables, dtype)
    key_scale = _gather(cache.key_scale, tables).to(dtype).transpose(-1, -2)  # [B, H, S, 1] -> [B, H, 1, S]
    value_scale = _gather(cache.value_scale, tables).to(dtype).transpose(-1, -2)
    return keys, values, key_scale, value_scale


def _codes_by_head(cache: torch.Tensor, tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes of the blocks in `tables` as `dtype`, laid out [B, H, nb * bs, D] contiguously for the matmuls.

    Transposed while still 1-byte codes, then converted: 3x cheaper than converting the strided view and
    letting matmul copy it again (measured for int8; fp8's conversion is slow on CPU either way).
    """
    batch, num_blocks = tables.shape
    codes = _blocks(cache, tables).view(batch, num_blocks * cache.shape[1], cache.shape[2], -1)  # [B, L, H, D]
    return codes_as(codes.transpose(1, 2).contiguous(), dtype)


def _tails_within(tails: ResidualTails | None, first: int, count: int) -> ResidualTails | None:
    """The int4 residual tails that fall in table columns [first, first + count), renumbered from 0."""
    if tails is None or not tails.rows.numel():
        return tails
    inside = (tails.blocks >= first) & (tails.blocks < first + count)
    return ResidualTails(tails.rows[inside], tails.blocks[inside] - first, tails.slots[inside])


def _window_attention(query: torch.Tensor, sink_query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor, num_sinks: int, scale: float) -> torch.Tensor:
    """Softmax attention where the first `num_sinks` key columns are scored with `sink_query`.

    query / sink_query [..., n, D], keys / values [..., L, D] (broadcasting), mask [..., n, L] bool -> [..., n, D].
    """
    scores = query @ keys.transpose(-1, -2)  # [..., n, L]
    if num_sinks:
        scores[..., :num_sinks] = sink_query @ keys[..., :num_sinks, :].transpose(-1, -2)
    scores = (scores * scale).masked_fill_(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def _soft_capped(scores: torch.Tensor, soft_cap: float | None) -> torch.Tensor:
    """soft_cap * tanh(scores / soft_cap): scores kept within +-soft_cap (Gemma 2); unchanged without a cap."""
    return scores if soft_cap is None else torch.tanh(scores / soft_cap) * soft_cap


def _capped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float, soft_cap: float) -> torch.Tensor:
    """Softmax attention with soft-capped scores (SDPA has no cap): query [..., n, D], keys / values [..., L, D]
    (broadcasting), mask [..., n, L] bool -> [..., n, D]."""
    scores = _soft_capped((query @ keys.transpose(-1, -2)) * scale, soft_cap).masked_fill_(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values
