"""Pure-torch paged attention: the CPU path and the oracle every faster backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionMetadata, PrefillSeq


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values [T, Hkv, D] at their slots of the caches [num_blocks, block_size, Hkv, D]."""
    num_kv_heads = key_cache.shape[2]
    key_cache.view(-1, num_kv_heads, key_cache.shape[3]).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, value_cache.shape[3]).index_copy_(0, slot_mapping, value)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Read whole blocks: cache [N, bs, H, D], tables [B, nb] -> [B, H, nb * bs, D]."""
    batch, num_blocks = block_tables.shape
    blocks = cache[block_tables]  # [B, nb, bs, H, D]
    return blocks.view(batch, num_blocks * cache.shape[1], cache.shape[2], -1).transpose(1, 2)


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    key_cache: torch.Tensor, value_cache: torch.Tensor,
                    metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write K/V to the cache, then attend: query [T, Hq, D] -> output [T, Hq, D]."""
    write_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
    output = torch.empty_like(query)
    if metadata.num_decodes:
        output[:metadata.num_decodes] = _decode(query[:metadata.num_decodes], key_cache,
                                                value_cache, metadata, scale)
    for seq in metadata.prefills:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        output[rows] = _prefill(query[rows], key[rows], value[rows], key_cache, value_cache,
                                seq, scale)
    return output


def _decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per request, all requests in one batched call."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    keys = gather_kv(key_cache, metadata.decode_block_tables)  # [B, Hkv, L, D]
    values = gather_kv(value_cache, metadata.decode_block_tables)
    # GQA without copying K/V per query head: the query heads sharing a KV head become that
    # head's "query length". [B, Hq, D] -> [B, Hkv, G, D]
    grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=metadata.decode_mask,
                                         scale=scale)  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, -1)


def _prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             key_cache: torch.Tensor, value_cache: torch.Tensor, seq: PrefillSeq,
             scale: float) -> torch.Tensor:
    """Causal attention of one request's new tokens over its cached prefix and themselves."""
    num_cached = seq.seq_len - seq.query_len
    if num_cached == 0:
        # Nothing cached before: the fresh K/V are the whole sequence. [n, H, D] -> [H, n, D]
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
        mask = None
    else:
        keys = gather_kv(key_cache, seq.block_table[None])[0, :, :seq.seq_len]  # [Hkv, S, D]
        values = gather_kv(value_cache, seq.block_table[None])[0, :, :seq.seq_len]
        # Query i sits at position num_cached + i and sees keys 0..num_cached + i.
        key_pos = torch.arange(seq.seq_len, device=query.device)
        query_pos = torch.arange(num_cached, seq.seq_len, device=query.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [n, S]
    out = F.scaled_dot_product_attention(query.transpose(0, 1), keys, values, attn_mask=mask,
                                         is_causal=mask is None, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # [n, Hq, D]
