"""Pure-torch paged attention: the CPU path and the oracle every faster backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionMetadata, PrefillSeq
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.kv.kv_quant import dequantize, quantize


def write_kv(key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values [T, Hkv, D] at their slots, quantizing on the way in if the cache is."""
    if cache.is_quantized:
        key, key_scale = quantize(key, cache.kv_cache_dtype)
        value, value_scale = quantize(value, cache.kv_cache_dtype)
        _flat(cache.key_scale).index_copy_(0, slot_mapping, key_scale)
        _flat(cache.value_scale).index_copy_(0, slot_mapping, value_scale)
    _flat(cache.key).index_copy_(0, slot_mapping, key)
    _flat(cache.value).index_copy_(0, slot_mapping, value)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, H, D] -> [num_slots, H, D] (a view)."""
    return cache.view(-1, cache.shape[2], cache.shape[3])


def gather_kv(cache: LayerKVCache, block_tables: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Read whole blocks, dequantized block by block: tables [B, nb] -> keys, values [B, H, nb * bs, D]."""
    keys, values = _gather(cache.key, block_tables), _gather(cache.value, block_tables)
    if cache.is_quantized:
        keys = dequantize(keys, _gather(cache.key_scale, block_tables), dtype)
        values = dequantize(values, _gather(cache.value_scale, block_tables), dtype)
    return keys, values


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, H, D], tables [B, nb] -> [B, H, nb * bs, D]."""
    batch, num_blocks = block_tables.shape
    blocks = cache[block_tables]  # [B, nb, bs, H, D]
    return blocks.view(batch, num_blocks * cache.shape[1], cache.shape[2], -1).transpose(1, 2)


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                    metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write K/V to the cache, then attend: query [T, Hq, D] -> output [T, Hq, D]."""
    write_kv(key, value, cache, metadata.slot_mapping)
    output = torch.empty_like(query)
    if metadata.num_decodes:
        output[:metadata.num_decodes] = _decode(query[:metadata.num_decodes], cache, metadata, scale)
    for seq in metadata.prefills:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        output[rows] = _prefill(query[rows], key[rows], value[rows], cache, seq, scale)
    return output


def _decode(query: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per request, all requests in one batched call."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = cache.key.shape[2]
    keys, values = gather_kv(cache, metadata.decode_block_tables, query.dtype)  # [B, Hkv, L, D]
    # GQA without copying K/V per query head: the query heads sharing a KV head become that
    # head's "query length". [B, Hq, D] -> [B, Hkv, G, D]
    grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=metadata.decode_mask,
                                         scale=scale)  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, -1)


def _prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
             seq: PrefillSeq, scale: float) -> torch.Tensor:
    """Causal attention of one request's new tokens over its cached prefix and themselves."""
    num_cached = seq.seq_len - seq.query_len
    if num_cached == 0:
        # Nothing cached before: the fresh K/V are the whole sequence. [n, H, D] -> [H, n, D]
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
        mask = None
    else:
        keys, values = gather_kv(cache, seq.block_table[None], query.dtype)
        keys, values = keys[0, :, :seq.seq_len], values[0, :, :seq.seq_len]  # [Hkv, S, D]
        # Query i sits at position num_cached + i and sees keys 0..num_cached + i.
        key_pos = torch.arange(seq.seq_len, device=query.device)
        query_pos = torch.arange(num_cached, seq.seq_len, device=query.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [n, S]
    group = query.shape[1] // keys.shape[0]
    if group > 1:  # GQA: one K/V copy per query head; SDPA's own enable_gqa falls back to a slow kernel
        keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
    # A batch dimension of 1: CPU SDPA takes its fused flash kernel only for 4-D inputs (3-4x faster).
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                         is_causal=mask is None, scale=scale)
    return out[0].transpose(0, 1)  # [n, Hq, D]
