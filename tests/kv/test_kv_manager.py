"""KVCacheManager with plain ints: block tables, reference counts under prefix sharing, caching of full blocks,
eviction order in a tiny pool, sliding-window eviction, usage; every test ends with no block leaked."""

from kvserve.kv.kv_manager import EVICTED, KVCacheManager
from kvserve.kv.prefix_cache import hash_block


def prompt(start: int, length: int) -> list[int]:
    """`length` token ids from `start` on: distinct prompts share no block."""
    return list(range(start, start + length))


def run_prompt(manager: KVCacheManager, request_id: str, token_ids: list[int]) -> list[int]:
    """Admit a request as the scheduler does (prefix lookup, allocation), compute it all, cache its full blocks."""
    prefix = manager.find_cached_prefix(token_ids)
    assert manager.allocate_slots(request_id, len(token_ids), prefix)
    manager.cache_full_blocks(request_id, token_ids, len(token_ids))
    return manager.block_table(request_id)


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


def test_shared_prefix_blocks_are_reference_counted_and_freed_once_by_each_holder():
    manager = KVCacheManager(num_blocks=6, block_size=2)
    table_a = run_prompt(manager, "a", prompt(1, 5))  # 3 blocks, the first 2 full
    table_b = run_prompt(manager, "b", prompt(1, 4) + [99])  # hits the 2 full blocks, adds 1
    assert table_b[:2] == table_a[:2] and table_b[2] != table_a[2]
    assert [manager.pool.ref_count(block) for block in table_a] == [2, 2, 1]
    assert manager.pool.num_used_blocks == 4
    manager.free("a")
    assert [manager.pool.ref_count(block) for block in table_b] == [1, 1, 1]
    assert manager.pool.num_used_blocks == 3  # the shared blocks stay with b
    manager.free("b")
    assert manager.pool.num_free_blocks == 6 and manager.usage == 0.0


def test_only_computed_full_blocks_are_cached():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    tokens = prompt(1, 12)
    assert manager.allocate_slots("a", 12)
    manager.cache_full_blocks("a", tokens, 3)  # not one full block computed yet
    assert manager.find_cached_prefix(tokens).blocks == []
    manager.cache_full_blocks("a", tokens, 6)  # one full block
    assert manager.find_cached_prefix(tokens).blocks == manager.block_table("a")[:1]
    manager.cache_full_blocks("a", tokens, 12)  # all three
    # A hit always leaves at least one token to compute: 12 tokens reuse 2 blocks, 13 reuse all 3.
    assert manager.find_cached_prefix(tokens).blocks == manager.block_table("a")[:2]
    assert manager.find_cached_prefix(tokens + [0]).blocks == manager.block_table("a")
    # Another block after the same first block is a miss from there on (hashes chain through parents).
    assert manager.find_cached_prefix(tokens[:4] + [0, 0, 0, 0, 0]).blocks == manager.block_table("a")[:1]
    manager.free("a")
    assert manager.pool.num_free_blocks == 8


def test_freed_blocks_stay_cached_until_the_pool_needs_them_tail_first():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    tokens = prompt(1, 6)
    table = run_prompt(manager, "a", tokens)  # 3 cached blocks; 1 block never used
    manager.free("a")
    assert manager.find_cached_prefix(tokens + [0]).blocks == table  # still cached while free
    # New blocks come from the never-used block, then from a's tail: its shared prefix is evicted last.
    run_prompt(manager, "b", prompt(100, 4))
    assert manager.find_cached_prefix(tokens + [0]).blocks == table[:2]
    manager.free("b")
    run_prompt(manager, "c", prompt(200, 2))  # least recently freed first: a's second block, not b's
    assert manager.find_cached_prefix(tokens + [0]).blocks == table[:1]
    manager.free("c")
    assert manager.pool.num_free_blocks == 4


def test_full_pool_refuses_new_requests_until_one_is_freed():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    assert manager.allocate_slots("a", 6)
    assert not manager.allocate_slots("b", 3)  # needs 2 blocks, 1 free
    assert manager.allocate_slots("b", 2)
    assert manager.usage == 1.0
    assert not manager.allocate_slots("a", 7)  # growing needs a block too
    manager.free("b")
    assert manager.allocate_slots("a", 7) and manager.num_held_blocks("a") == 4
    manager.free("a")
    assert manager.usage == 0.0


def test_window_frees_blocks_between_sinks_and_window():
    # Sinks: the first 2 tokens (block 0); window: the last 4 tokens.
    manager = KVCacheManager(num_blocks=8, block_size=2, window=4, num_sinks=2)
    assert manager.allocate_slots("a", 10)  # 5 blocks: positions 0-9
    table = list(manager.block_table("a"))
    # A query at position 10 sees keys 7..9 and the sinks: blocks 1 (2-3) and 2 (4-5) are dead, 3 (6-7) is not.
    manager.evict_outside_window("a", 10)
    assert manager.block_table("a") == [table[0], EVICTED, EVICTED, table[3], table[4]]
    assert manager.num_held_blocks("a") == 3 and manager.pool.num_free_blocks == 5
    manager.evict_outside_window("a", 10)  # idempotent
    assert manager.pool.num_free_blocks == 5
    assert manager.allocate_slots("a", 14)  # grows past its evicted blocks
    manager.evict_outside_window("a", 14)  # positions 0-1 (sinks) and 11-13 stay: 10-11 is block 5
    assert manager.block_table("a")[:5] == [table[0], EVICTED, EVICTED, EVICTED, EVICTED]
    assert manager.num_held_blocks("a") == 3
    manager.free("a")  # evicted entries are not freed twice
    assert manager.pool.num_free_blocks == 8


def test_no_window_evicts_nothing():
    manager = KVCacheManager(num_blocks=8, block_size=2)
    assert manager.allocate_slots("a", 10)
    manager.evict_outside_window("a", 10)
    assert EVICTED not in manager.block_table("a") and manager.num_held_blocks("a") == 5
    manager.free("a")
    assert manager.pool.num_free_blocks == 8


def test_usage_follows_allocation():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    assert manager.usage == 0.0 and manager.num_blocks == 4
    assert manager.allocate_slots("a", 5)
    assert manager.usage == 0.5
    assert manager.allocate_slots("b", 1)
    assert manager.usage == 0.75
    manager.free("a")
    manager.free("b")
    assert manager.usage == 0.0
