"""Attention sinks + sliding window against a dense StreamingLLM reference that re-positions the cache.

The reference stores keys unrotated and, for every query, rotates queries and keys at their positions in a
compacted cache (sinks at 0..S-1, the window right after). Our cache keeps keys rotated at their true positions,
drops whole blocks, and shifts only the sink scores; both must give the same attention.
"""

import functools

import pytest
import torch

from kvserve.attention.backend import AttentionRequirements
from kvserve.attention.selector import create_attention_backend
from kvserve.kv.kv_cache import allocate_kv_caches
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.kv.sinks_window import SinksWindow, held_blocks
from kvserve.kv.window_layout import SinksWindowLayout
from kvserve.layers.rotary import RotaryEmbedding, apply_rotary
from kvserve.runner.attention_inputs import build_common_metadata

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


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize(("window", "sinks", "chunk"), [(8, 4, 3), (8, 4, 1), (6, 2, 5), (9, 0, 4), (7, 5, 16)])
def test_paged_window_matches_streaming_reference(window, sinks, chunk, backend_name):
    """Prompt chunks, then decodes (chunk 1), far past the window; triton's kernels run interpreted on a CPU."""
    torch.manual_seed(0)
    length = 60
    q_raw, k_raw = torch.randn(length, HEADS, DIM), torch.randn(length, KV_HEADS, DIM)
    v = torch.randn(length, KV_HEADS, DIM)
    cache = allocate_kv_caches([KVCacheSpec(KV_HEADS, DIM, DIM, "float32")], 40, BLOCK, "cpu")[0]
    manager = KVCacheManager(40, BLOCK, enable_prefix_caching=False, window=window, num_sinks=sinks)
    rotation = functools.partial(ROTARY.rotation, dtype=torch.float32)
    layout = SinksWindowLayout(SinksWindow(window, sinks, BLOCK), rotation)
    if backend_name == "triton":
        pytest.importorskip("triton")
    backend = create_attention_backend(backend_name, AttentionRequirements(torch.device("cpu"), "float32",
                                                                           use_window=True, use_mla=False))
    max_held = 0
    for start in range(0, length, chunk):
        count = min(chunk, length - start)
        manager.evict_outside_window("r", start)
        assert manager.allocate_slots("r", start + count)
        table = manager.block_table("r")
        max_held = max(max_held, len(held_blocks(table)[0]))
        common = build_common_metadata(["r"], [start], [count], [table], BLOCK, torch.device("cpu"), window=layout)
        positions = common.positions
        # Our cache holds keys rotated at their true positions; queries too.
        out = backend.forward(rotate(q_raw[positions], positions), rotate(k_raw[positions], positions),
                              v[positions], cache, backend.build_metadata(common), DIM ** -0.5)
        for row, position in enumerate(positions.tolist()):
            expected = streaming_reference(q_raw[position], k_raw, v, position, window, sinks)
            torch.testing.assert_close(out[row], expected, atol=2e-5, rtol=1e-4)
    # Memory stays bounded: sink blocks plus the window and one chunk.
    assert max_held <= -(-sinks // BLOCK) + -(-(window - 1 + chunk) // BLOCK) + 1
    assert manager.pool.num_used_blocks == len(held_blocks(manager.block_table("r"))[0])
    manager.free("r")
    assert manager.pool.num_free_blocks == 40
