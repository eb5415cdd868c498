"""Multi-head Latent Attention over the paged cache: the weight-free half of DeepSeek-V2/V3 attention.

Per token and layer the cache holds one latent row [d_c + d_rope]: the compressed KV latent c_kv and the
shared, already rotated RoPE key k_rope. It is stored as a single KV "head" with keys of that width and
values of width 0 (`KVCacheSpec(1, d_c + d_rope, 0, dtype)`), written and read only through `write_kv` /
`gather_kv`, so int8/fp8 latent caches work like any other cache.

Two ways to attend, picked per step by the model (see `kvserve.models.deepseek.MLAAttention`):
- prefill: up-project the latents to per-head K/V and run ordinary causal attention (`causal_attention`);
- decode: absorb the up-projections into query and output and attend straight over the latents, MQA-style
  (`absorbed_decode`), so the history is never expanded to per-head K/V.
The cache-facing functions here are what the torch backend's MLA entry points run (attention/torch_backend.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.torch_metadata import PrefillSeq, TorchAttentionMetadata
from kvserve.attention.torch_ref import gather_kv, write_kv
from kvserve.kv.kv_cache import LayerKVCache


def write_latent(latent: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
    """Store this step's latents [T, d_c + d_rope] at their slots (one KV head, no value)."""
    num_tokens = latent.shape[0]
    # [T, D] -> [T, 1, D]: a single latent head; the value side is empty, [T, 1, 0].
    write_kv(latent[:, None], latent.new_empty(num_tokens, 1, 0), cache, slot_mapping)


def prefill_latents(fresh: torch.Tensor, cache: LayerKVCache, seq: PrefillSeq) -> torch.Tensor:
    """The latents [S, D] of a whole prefilling sequence: its cached prefix from the cache, then `fresh` [n, D]."""
    num_cached = seq.seq_len - seq.query_len
    if num_cached == 0:
        return fresh
    latents, _ = gather_kv(cache, seq.block_table[None], fresh.dtype)  # [1, 1, nb * bs, D]
    # The fresh rows are used as computed (not read back): exact even when the cache is quantized.
    return torch.cat([latents[0, 0, :num_cached], fresh], dim=0)  # [S, D]


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query [n, H, Dk] (the last n of S positions), key [S, H, Dk], value [S, H, Dv] -> [n, H, Dv]."""
    num_queries, num_keys = query.shape[0], key.shape[0]
    num_cached = num_keys - num_queries
    mask = None
    if num_cached:
        # Query i sits at position num_cached + i and sees keys 0..num_cached + i.
        key_pos = torch.arange(num_keys, device=query.device)
        query_pos = torch.arange(num_cached, num_keys, device=query.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [n, S]
    # [n, H, D] -> [1, H, n, D]: a batch dimension of 1 lets CPU SDPA take its fused kernel.
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                         value.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                         scale=scale)  # [1, H, n, Dv]
    return out[0].transpose(0, 1)  # [n, H, Dv]


def absorbed_decode(query: torch.Tensor, cache: LayerKVCache, metadata: TorchAttentionMetadata, kv_lora_rank: int,
                    scale: float) -> torch.Tensor:
    """Latent-space queries [B, H, d_c + d_rope] of the decodes -> attention-weighted latents [B, H, d_c].

    Keys are the cached latent rows [d_c + d_rope]; values are their first d_c columns (c_kv itself). All H
    query heads share that one latent head, so this is MQA with key width d_c + d_rope and value width d_c.
    """
    latents, _ = gather_kv(cache, metadata.decode_block_tables, query.dtype)  # [B, 1, L, d_c + d_rope]
    values = latents[..., :kv_lora_rank]  # [B, 1, L, d_c], a view
    # The H heads become the "query length" of the single KV head: [B, H, D] -> [B, 1, H, D]; the mask
    # [B, 1, 1, L] broadcasts over them.
    out = F.scaled_dot_product_attention(query[:, None], latents, values, attn_mask=metadata.decode_mask,
                                         scale=scale)  # [B, 1, H, d_c]
    return out[:, 0]
