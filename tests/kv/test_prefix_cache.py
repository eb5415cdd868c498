"""Prefix cache and LRU free list: hits check tokens, freed blocks stay reusable until evicted."""

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.prefix_cache import PrefixCache, hash_block


def test_lookup_checks_parent_and_tokens_not_only_the_hash():
    cache = PrefixCache()
    assert cache.insert(3, block_hash=42, parent_hash=None, token_ids=(1, 2))
    assert cache.lookup(42, None, (1, 2)) == 3
    assert cache.lookup(42, None, (1, 3)) is None  # same hash, other tokens: a collision
    assert cache.lookup(42, 7, (1, 2)) is None  # same tokens after another parent
    assert not cache.insert(5, block_hash=42, parent_hash=None, token_ids=(9, 9))
    assert cache.insert(6, block_hash=42, parent_hash=None, token_ids=(1, 2))  # same content: fine
    assert cache.lookup(42, None, (1, 2)) == 3


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for block in (a, b, c):
        pool.prefix_cache.insert(block, block, None, (block,))
    pool.free([b])
    pool.free([a])
    pool.free([c])
    assert pool.prefix_cache.lookup(a, None, (a,)) == a  # still cached while free
    assert pool.allocate(1) == [b]  # b was freed first
    assert pool.prefix_cache.lookup(b, None, (b,)) is None
    pool.touch([a])  # revive a cached free block
    assert pool.num_free_blocks == 1 and pool.ref_count(a) == 1


def test_manager_shares_prefix_and_counts_hits():
    manager = KVCacheManager(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    assert manager.allocate_slots("a", 5)
    manager.cache_full_blocks("a", prompt, 5)
    prefix = manager.find_cached_prefix(prompt + [6])
    assert prefix.blocks == manager.block_table("a")[:2]
    assert prefix.hashes[1] == hash_block(hash_block(None, (1, 2)), (3, 4))
    assert manager.allocate_slots("b", 6, prefix)
    assert manager.block_table("b")[:2] == prefix.blocks
    assert manager.num_prefix_hits == 4 and manager.num_prefix_queries == 6
    manager.free("a")
    manager.free("b")
    assert manager.pool.num_free_blocks == 8


def test_reviving_free_cached_blocks_counts_against_capacity():
    manager = KVCacheManager(num_blocks=3, block_size=2)
    assert manager.allocate_slots("a", 4)
    manager.cache_full_blocks("a", [1, 2, 3, 4], 4)
    manager.free("a")  # 3 free blocks, 2 of them cached
    prefix = manager.find_cached_prefix([1, 2, 3, 4, 5])
    assert len(prefix.blocks) == 2
    assert not manager.allocate_slots("b", 7, prefix)  # 2 revived + 2 new > 3 free
    assert manager.block_table("b") == [] and manager.pool.num_free_blocks == 3
    assert manager.allocate_slots("b", 6, prefix)
    assert manager.pool.num_free_blocks == 0


def test_disabled_prefix_caching_finds_nothing():
    manager = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    assert manager.allocate_slots("a", 4)
    manager.cache_full_blocks("a", [1, 2, 3, 4], 4)
    assert manager.find_cached_prefix([1, 2, 3, 4, 5]).blocks == []
