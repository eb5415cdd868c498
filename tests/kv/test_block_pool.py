"""Block pool and KV manager: allocation, reference counts, no leaks, no double frees."""

import pytest

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.kv_spec import KVCacheSpec, bytes_per_token, num_blocks_for_budget


def test_allocate_and_free_round_trip():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and pool.num_free_blocks == 1
    assert all(pool.ref_count(b) == 1 for b in blocks)
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="asked for 3 blocks, 2 free"):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_double_free_raises():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(blocks)


def test_manager_grows_tables_by_whole_blocks():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    assert manager.allocate_slots("a", 5)
    assert len(manager.block_table("a")) == 2
    assert manager.allocate_slots("a", 8)  # still fits in two blocks
    assert len(manager.block_table("a")) == 2
    assert manager.allocate_slots("a", 9)
    assert len(manager.block_table("a")) == 3


def test_manager_refuses_without_partial_allocation():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    assert manager.allocate_slots("a", 8)
    assert not manager.allocate_slots("b", 12)
    assert manager.block_table("b") == [] and manager.pool.num_free_blocks == 1
    manager.free("a")
    manager.free("b")
    manager.free("unknown")
    assert manager.pool.num_free_blocks == 3


def test_spec_bytes_and_budget():
    spec = KVCacheSpec(num_kv_heads=3, key_dim=64, value_dim=64, dtype="float32")
    assert spec.elements_per_token == 384 and spec.bytes_per_token == 1536
    specs = [spec] * 30
    assert bytes_per_token(specs) == 46080
    assert num_blocks_for_budget(specs, 16, 46080 * 16 * 10 + 5) == 10
    with pytest.raises(ValueError, match="KV cache dtype must be one of"):
        KVCacheSpec(1, 1, 1, "float64")
