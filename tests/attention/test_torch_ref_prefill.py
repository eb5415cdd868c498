"""torch_ref's prefill over a cached prefix (one masked SDPA call per request) against plain float64 math."""

from __future__ import annotations

import pytest
import torch
from paged_cases import make_step

from kvserve.attention import torch_ref


def dense_attention(step, seq_index: int) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v in float64, from the cache after the step's write: [n, Hq, D]."""
    seq = step.metadata.prefills[seq_index]
    rows = slice(seq.query_start, seq.query_start + seq.query_len)
    block_size = step.cache.key.shape[1]
    pos = torch.arange(seq.seq_len)
    slots = seq.block_table[pos // block_size] * block_size + pos % block_size
    keys = step.cache.key.flatten(0, 1)[slots].double()  # [S, Hkv, D]
    values = step.cache.value.flatten(0, 1)[slots].double()
    query = step.query[rows].double()  # [n, Hq, D]
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,shd->hns", query, keys) * step.scale
    visible = pos[None, :] <= torch.arange(seq.seq_len - seq.query_len, seq.seq_len)[:, None]  # [n, S]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hns,shd->nhd", weights, values)


@pytest.mark.parametrize("shape", [(3, 3, 64, 16), (1, 4, 32, 8), (4, 1, 16, 4)],
                         ids=lambda s: f"hkv{s[0]}-g{s[1]}-d{s[2]}-bs{s[3]}")
def test_chunk_after_a_cached_prefix_matches_dense_math(shape):
    num_kv_heads, group, head_dim, block_size = shape
    # (seq_len, query_len): prefixes shorter than, equal to and longer than the chunk, and one block-aligned
    requests = [(40, 7), (24, 12), (13, 12), (64, 16), (20, 20)]
    step = make_step(requests, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size)
    out = torch_ref.paged_attention(step.query, step.key, step.value, step.cache, step.metadata, step.scale)
    for index, seq in enumerate(step.metadata.prefills):
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        torch.testing.assert_close(out[rows].double(), dense_attention(step, index), atol=1e-5, rtol=1e-4)
