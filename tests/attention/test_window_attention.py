"""Attention sinks + sliding window against a dense StreamingLLM reference that re-positions the cache.

The reference stores keys unrotated and, for every query, rotates queries and keys at their positions in a
compacted cache (sinks at 0..S-1, the window right after). Our cache keeps keys rotated at their true positions,
drops whole blocks, and shifts only the sink scores; both must give the same attention.
"""

import pytest
import torch

from kvserve.attention.backend import AttentionMetadata, PrefillSeq, WindowMetadata
from kvserve.attention.torch_ref import paged_attention
from kvserve.kv.kv_cache import allocate_kv_caches
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.rotary import RotaryEmbedding, apply_rotary
from kvserve.runner.cache_plans import held_blocks, key_positions, window_visible

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 16
ROTARY = RotaryEmbedding(DIM, 512, 10000.0)


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return apply_rotary(x, ROTARY.lookup(positions, torch.float32))


def streaming_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int, window: int,
                        sinks: int) -> torch.Tensor:
    """One query at `position` over unrotated k/v [L, Hkv, D] with StreamingLLM's compacted positions."""
    visible = [i for i in range(position + 1) if i < sinks or i > position - window]
    compact = torch.arange(len(visible))  # the re-positioned cache: no gaps
    keys = rotate(k[visible], compact)
    query = rotate(q[None], compact[-1:])[0]  # the query is the last token of the compacted cache
    keys, values = keys.repeat_interleave(HEADS // KV_HEADS, 1), v[visible].repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("hd,lhd->hl", query, keys) * DIM ** -0.5
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), values)


@pytest.mark.parametrize(("window", "sinks", "chunk"), [(8, 4, 3), (8, 4, 1), (6, 2, 5), (9, 0, 4), (7, 5, 16)])
def test_paged_window_matches_streaming_reference(window, sinks, chunk):
    torch.manual_seed(0)
    length = 60
    q_raw, k_raw = torch.randn(length, HEADS, DIM), torch.randn(length, KV_HEADS, DIM)
    v = torch.randn(length, KV_HEADS, DIM)
    cache = allocate_kv_caches([KVCacheSpec(KV_HEADS, DIM, DIM, "float32")], 40, BLOCK, "cpu")[0]
    manager = KVCacheManager(40, BLOCK, enable_prefix_caching=False, window=window, num_sinks=sinks)
    max_held = 0
    for start in range(0, length, chunk):
        count = min(chunk, length - start)
        manager.evict_outside_window("r", start)
        assert manager.allocate_slots("r", start + count)
        table = manager.block_table("r")
        blocks, indices = held_blocks(table)
        max_held = max(max_held, len(blocks))
        positions = torch.arange(start, start + count)
        slots = torch.tensor(table)[positions // BLOCK] * BLOCK + positions % BLOCK
        delta = (positions - (sinks + window - 1)).clamp_min(0)
        cos, sin = ROTARY.rotation(delta, torch.float32)
        key_mask = window_visible(key_positions(indices, BLOCK, torch.device("cpu")), positions, window, sinks)
        seq = PrefillSeq(0, count, start + count, torch.tensor(blocks), key_mask=key_mask)
        is_decode = count == 1
        decode_tables = torch.tensor([blocks] if is_decode else [], dtype=torch.long)
        metadata = AttentionMetadata(
            slot_mapping=slots, num_decodes=int(is_decode),
            decode_block_tables=decode_tables.view(int(is_decode), len(blocks) if is_decode else 0),
            decode_mask=key_mask[None, None] if is_decode else torch.zeros(0, 1, 1, 0, dtype=torch.bool),
            prefills=[] if is_decode else [seq],
            window=WindowMetadata(sinks, window, (cos, -sin), delta[:int(is_decode)] > 0))
        # Our cache holds keys rotated at their true positions; queries too.
        out = paged_attention(rotate(q_raw[positions], positions), rotate(k_raw[positions], positions),
                              v[positions], cache, metadata, DIM ** -0.5)
        for row, position in enumerate(positions.tolist()):
            expected = streaming_reference(q_raw[position], k_raw, v, position, window, sinks)
            torch.testing.assert_close(out[row], expected, atol=2e-5, rtol=1e-4)
    # Memory stays bounded: sink blocks plus the window and one chunk.
    assert max_held <= -(-sinks // BLOCK) + -(-(window - 1 + chunk) // BLOCK) + 1
    assert manager.pool.num_used_blocks == len(held_blocks(manager.block_table("r"))[0])
    manager.free("r")
    assert manager.pool.num_free_blocks == 40
