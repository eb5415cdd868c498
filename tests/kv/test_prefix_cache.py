"""Prefix cache and LRU free list: hits check tokens, freed blocks stay reusable until evicted."""

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.prefix_cache import PrefixCache


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
