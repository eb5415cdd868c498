"""CPU paged attention with a compiled decode kernel (native/paged_decode.c); prefill and the rest stay on torch_ref.

Why: a batched decode step on torch copies every sequence's blocks into a padded tensor, then SDPA reads the
copy again, so the KV cache is streamed about three times per layer. The C kernel reads each block once, in
place, and only up to each sequence's own length (64 decodes of 150-400 tokens, 3 of 9 heads, from a cold
cache: 1.1-1.5 vs 8-9 ms per layer on the 2-core CPU). Built on first use (kvserve.native); without a
compiler the engine stays on torch.
"""

from __future__ import annotations

import torch

from kvserve import native
from kvserve.attention import torch_ref
from kvserve.attention.backend import AttentionMetadata
from kvserve.kv.kv_cache import LayerKVCache


def available() -> bool:
    """Whether the compiled kernel can run here."""
    return native.load("paged_decode") is not None


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                    metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """torch_ref.paged_attention, with the decode rows of plain float32 caches on the compiled kernel."""
    plain = (query.dtype == torch.float32 and cache.key.dtype == torch.float32 and metadata.window is None
             and cache.key.shape[-1] == cache.value.shape[-1])
    return torch_ref.paged_attention(query, key, value, cache, metadata, scale, decode=decode if plain else None)


def decode(query: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence: query [B, Hq, D] -> [B, Hq, D]."""
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = cache.key.shape
    query = query.contiguous()
    tables = metadata.decode_block_tables.contiguous()
    seq_lens = metadata.decode_seq_lens
    if seq_lens is None:  # metadata built by hand (tests): the key mask tells each length
        seq_lens = metadata.decode_mask.view(batch, -1).sum(dim=-1)
    seq_lens = seq_lens.to(torch.int64).contiguous()
    if batch and int(seq_lens.max()) > tables.shape[1] * block_size:  # the kernel trusts the tables: check
        raise ValueError(f"a decode attends {int(seq_lens.max())} tokens but its block table holds "
                         f"{tables.shape[1] * block_size}")
    out = torch.empty_like(query)
    status = native.load("paged_decode").paged_decode_f32(
        query.data_ptr(), cache.key.data_ptr(), cache.value.data_ptr(), tables.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), batch, num_kv_heads, num_heads // num_kv_heads, head_dim, block_size, tables.shape[1],
        scale)
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffers")
    return out
