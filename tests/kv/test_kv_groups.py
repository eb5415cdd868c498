"""The hybrid KV cache: grouping layers, the blocks a long request holds per group, and prefix reuse."""

import pytest

from kvserve.kv.kv_groups import KVCacheGroups, blocks_per_request, first_visible_block, max_context
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.kv.sinks_window import EVICTED

FULL = KVCacheSpec(1, 256, 256, "float32")
LOCAL = KVCacheSpec(1, 256, 256, "float32", sliding_window=512)
GEMMA3_270M = ([LOCAL] * 5 + [FULL]) * 3  # 18 layers, 5 local : 1 global


def test_gemma3_layers_form_six_groups_of_three():
    groups = KVCacheGroups.from_specs(GEMMA3_270M)
    assert groups.layers[0] == (5, 11, 17)  # the full group first
    assert groups.windows == (None, 512, 512, 512, 512, 512)
    assert groups.group_size == 3 and groups.is_hybrid
    assert groups.group_of[:6] == [1, 1, 1, 2, 2, 0]
    assert groups.slot_of[:6] == [0, 1, 2, 0, 1, 0]
    assert groups.page_specs(GEMMA3_270M) == [FULL] * 3


def test_one_kind_is_one_group_of_every_layer():
    groups = KVCacheGroups.from_specs([FULL] * 4)
    assert groups.layers == ((0, 1, 2, 3),) and not groups.is_hybrid
    assert groups.slot_of == [0, 1, 2, 3]


def test_layers_of_different_shapes_cannot_share_a_pool():
    with pytest.raises(ValueError, match="same heads"):
        KVCacheGroups.from_specs([FULL, KVCacheSpec(2, 256, 256, "float32", sliding_window=512)])


def held(manager: KVCacheManager, request_id: str, group: int) -> list[int]:
    table = manager.block_table(request_id)[group::manager.num_groups]
    return [index for index, block in enumerate(table) if block != EVICTED]


def test_a_long_request_holds_its_window_in_local_groups_and_everything_in_global_ones():
    windows = KVCacheGroups.from_specs(GEMMA3_270M).windows
    manager = KVCacheManager(2000, 16, group_windows=windows)
    num_tokens = 1200  # 75 blocks
    assert manager.allocate_slots("a", num_tokens)
    manager.cache_full_blocks("a", list(range(num_tokens)), num_tokens)
    manager.evict_outside_window("a", num_tokens)
    first = first_visible_block(num_tokens, 512, 16)  # position 689's block: 43
    assert held(manager, "a", 0) == list(range(75))
    for group in range(1, 6):
        assert held(manager, "a", group) == list(range(first, 75))
    assert manager.num_held_blocks("a") == 75 + 5 * (75 - first)
    assert manager.pool.num_used_blocks == manager.num_held_blocks("a")
    manager.free("a")
    assert manager.pool.num_free_blocks == 2000


def test_a_prefix_hit_reuses_the_full_run_and_the_local_window():
    manager = KVCacheManager(2000, 16, group_windows=(None, 64))
    tokens = list(range(1000))
    manager.allocate_slots("a", len(tokens))
    manager.cache_full_blocks("a", tokens, len(tokens))
    manager.evict_outside_window("a", len(tokens))
    manager.free("a")
    prefix = manager.find_cached_prefix(tokens + [7])
    assert prefix.num_blocks == 62  # every full block of the 1000 tokens
    local = prefix.blocks[1::2]
    first = first_visible_block(62 * 16, 64, 16)
    assert all(block == EVICTED for block in local[:first]) and EVICTED not in local[first:]
    # The local blocks behind the window went back to the pool but keep their contents until reused: a shorter
    # prompt whose window needs them still finds them.
    short = manager.find_cached_prefix(tokens[:400])
    assert short.num_blocks == 24 and EVICTED not in short.blocks[1::2][first_visible_block(24 * 16, 64, 16):]


def test_a_prefix_is_cut_where_a_needed_local_block_was_reused():
    manager = KVCacheManager(200, 16, group_windows=(None, 32))
    tokens = list(range(320))  # 20 blocks
    manager.allocate_slots("a", len(tokens))
    manager.cache_full_blocks("a", tokens, len(tokens))
    local_block_12 = manager.block_table("a")[12 * 2 + 1]
    manager.free("a")
    manager.pool.touch([local_block_12])  # taken by someone else: its cached contents are gone
    manager.pool.prefix_cache.evict(local_block_12)
    # From block 14 on, the window (32 tokens = 2 blocks back) no longer needs block 12.
    prefix = manager.find_cached_prefix(tokens + [1])
    assert prefix.num_blocks == 20
    assert manager.find_cached_prefix(tokens[:13 * 16 + 1]).num_blocks == 12  # 13 needs 12: cut to 12


def test_the_context_that_fits_counts_only_the_windows_of_local_groups():
    windows = (None, 512, 512, 512, 512, 512)
    assert blocks_per_request(windows, 32768, 16, 2048) == 2048 + 5 * (-(-(511 + 2048) // 16) + 1)
    assert max_context((None,), 100, 16, 2048, 8192) == 1600
    hybrid = max_context(windows, 1000, 16, 256, 32768)
    assert blocks_per_request(windows, hybrid, 16, 256) <= 1000 < blocks_per_request(windows, hybrid + 16, 16, 256)
    assert hybrid > 1000 * 16 // 6  # more than a full cache of six groups holds


def test_kv_memory_reports_the_hybrid_layout_of_gemma3():
    from kvserve.kv.kv_memory import kv_memory_report, shape_from_hf_config

    config = {"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
              "sliding_window": 512, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3}
    report = kv_memory_report(shape_from_hf_config(config, "gemma3-270m"), context=32768)
    full = report.row("real").bytes_per_token["float32"]
    assert full == 18 * 2 * 256 * 4
    # Per token of a 32k context: 3 layers hold every token, 15 hold 512 of the 32,768.
    assert report.hybrid_bytes_per_token["float32"] == full * (3 + 15 * 512 / 32768) / 18
    assert report.to_dict()["hybrid"]["num_sliding_layers"] == 15
