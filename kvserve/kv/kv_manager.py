"""Per-request block tables on top of the block pool (pure Python: the scheduler's view of KV memory).

A hybrid cache (kv/kv_groups.py) gives a request one table per KV group; they are kept interleaved in one list,
entry `index * num_groups + group` for the request's block `index`, so the scheduler and the runner pass one list
of ints per request whatever the model. A sliding-window group's entries behind its window are EVICTED.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.kv_groups import first_visible_block
from kvserve.kv.prefix_cache import BlockTokens, CachedPrefix, hash_block
from kvserve.kv.sinks_window import EVICTED, SinksWindow


class KVCacheManager:
    """Maps each request to the blocks that hold its tokens' keys and values, sharing cached prefixes.

    `group_windows`: each KV group's sliding window (None: full attention); one group of full attention unless
    the model is hybrid.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None, num_sinks: int = 0,
                 group_windows: Sequence[int | None] = (None,)) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = None if window is None else SinksWindow(window, num_sinks, block_size)
        self.group_windows = tuple(group_windows)
        self.num_groups = len(self.group_windows)
        self._num_evicted: dict[str, int] = {}  # blocks evicted per request (they follow the sink blocks)
        self._num_slid: dict[str, int] = {}  # per request: leading blocks its sliding groups have dropped
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}
        self._block_hashes: dict[str, list[int]] = {}  # chained hashes of the request's full blocks
        self._uncacheable: set[str] = set()  # requests whose hash chain hit a collision
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        """Total blocks in the pool."""
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return self.pool.usage

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: list[int], record: bool = True) -> CachedPrefix:
        """The longest run of leading full blocks already cached; at least one token is left to compute.

        A hybrid cache: the full-attention groups need every block of the run, a sliding group only the blocks its
        window sees from the first position after it (the rest are EVICTED in the prefix), so a prefix whose
        early sliding blocks went back to the pool can still be reused.
        """
        prefix = CachedPrefix()
        if not self.enable_prefix_caching:
            return prefix
        size = self.block_size
        found: list[list[int | None]] = []  # per block: each group's cached block, or None
        parent = None
        for index in range((len(token_ids) - 1) // size):
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            block_hash = hash_block(parent, tokens)
            blocks = self._lookup(block_hash, parent, tokens)
            if any(block is None for block, window in zip(blocks, self.group_windows, strict=True) if window is None):
                break
            found.append(blocks)
            prefix.hashes.append(block_hash)
            parent = block_hash
        num_blocks = len(found)
        while num_blocks and not self._sliding_blocks_cached(found, num_blocks):
            num_blocks -= 1
        del prefix.hashes[num_blocks:]
        for index, blocks in enumerate(found[:num_blocks]):
            prefix.blocks.extend(EVICTED if window is not None and index < self._first_seen(num_blocks, window)
                                 else block for block, window in zip(blocks, self.group_windows, strict=True))
        if record:  # a lookup for a request (not for a KV transfer) counts in the hit rate
            self.num_prefix_queries += len(token_ids)
            self.num_prefix_hits += num_blocks * size
        return prefix

    def _lookup(self, block_hash: int, parent: int | None, tokens: BlockTokens) -> list[int | None]:
        """Each group's cached block for these tokens after this parent (None where it is not cached)."""
        cache = self.pool.prefix_cache
        return [cache.lookup(block_hash, parent, tokens, group) for group in range(self.num_groups)]

    def _first_seen(self, num_blocks: int, window: int) -> int:
        """The first block a window sees from the first position after `num_blocks` cached blocks."""
        return first_visible_block(num_blocks * self.block_size, window, self.block_size)

    def _sliding_blocks_cached(self, found: list[list[int | None]], num_blocks: int) -> bool:
        """Whether every sliding group has the blocks its window sees after the first `num_blocks`."""
        return all(found[index][group] is not None
                   for group, window in enumerate(self.group_windows) if window is not None
                   for index in range(self._first_seen(num_blocks, window), num_blocks))

    def allocate_slots(self, request_id: str, num_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        """Grow the request's table to `num_tokens` tokens, starting from `prefix` for a new request.

        Returns False, changing nothing, when the pool is short.
        """
        table = self._block_tables.get(request_id, [])
        shared = prefix.blocks if prefix and not table else []
        held = [block for block in shared if block != EVICTED]
        # Reviving a cached block that sits on the free list takes it from the free pool too.
        revived = sum(1 for block in held if self.pool.ref_count(block) == 0)
        missing = max(self.blocks_for_tokens(num_tokens) * self.num_groups - len(table) - len(shared), 0)
        if missing + revived > self.pool.num_free_blocks:
            return False
        if shared:
            self.pool.touch(held)
            self._block_hashes[request_id] = list(prefix.hashes)
        table = self._block_tables.setdefault(request_id, [])
        table.extend(shared)
        table.extend(self.pool.allocate(missing))
        return True

    def import_blocks(self, token_ids: list[int], first_block: int, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks for the sequence's full blocks from `first_block` on (whose K/V arrive from
        another instance) and register them in the prefix cache; the caller writes them, then frees them, and
        a request for the sequence finds them. None, taking nothing, when the pool is short. One KV group only."""
        if num_blocks > self.pool.num_free_blocks:
            return None
        blocks = self.pool.allocate(num_blocks)
        size, parent = self.block_size, None
        for index in range(first_block + num_blocks):
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            block_hash = hash_block(parent, tokens)
            if index >= first_block:
                self.pool.prefix_cache.insert(blocks[index - first_block], block_hash, parent, tokens)
            parent = block_hash
        return blocks

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that became full (their K/V written) in the prefix cache."""
        if not self.enable_prefix_caching or request_id in self._uncacheable:
            return
        hashes = self._block_hashes.setdefault(request_id, [])
        table = self._block_tables[request_id]
        size = self.block_size
        groups = self.num_groups
        for index in range(len(hashes), num_computed_tokens // size):
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            parent = hashes[-1] if hashes else None
            block_hash = hash_block(parent, tokens)
            blocks = table[index * groups:(index + 1) * groups]
            if not all(self.pool.prefix_cache.insert(block, block_hash, parent, tokens, group)
                       for group, block in enumerate(blocks) if block != EVICTED):
                self._uncacheable.add(request_id)  # a collision: later blocks would chain from it
                return
            hashes.append(block_hash)

    def evict_outside_window(self, request_id: str, num_computed_tokens: int) -> None:
        """Free the blocks that no query from position `num_computed_tokens` on can see (sinks stay; in a hybrid
        cache, the sliding groups' blocks behind their windows)."""
        if self.window is None:
            self._slide_groups(request_id, num_computed_tokens)
            return
        num_evicted = self._num_evicted.get(request_id, 0)
        dead = self.window.evict(self._block_tables.get(request_id, []), num_evicted, num_computed_tokens)
        if dead:
            self.pool.free(dead)
            self._num_evicted[request_id] = num_evicted + len(dead)

    def _slide_groups(self, request_id: str, num_computed_tokens: int) -> None:
        """Mark EVICTED and free each sliding group's blocks that its window no longer sees."""
        table = self._block_tables.get(request_id)
        windows = [window for window in self.group_windows if window is not None]
        if not table or not windows:
            return
        start = self._num_slid.get(request_id, 0)
        num_blocks = len(table) // self.num_groups
        end = min(self._first_seen_from(num_computed_tokens, min(windows)), num_blocks)
        dead = []
        for index in range(start, end):
            for group, window in enumerate(self.group_windows):
                column = index * self.num_groups + group
                visible = window is None or index >= self._first_seen_from(num_computed_tokens, window)
                if not visible and table[column] != EVICTED:
                    dead.append(table[column])
                    table[column] = EVICTED
        self.pool.free(dead)
        # Every group has dropped the blocks before the widest window's first: later scans start there.
        self._num_slid[request_id] = max(start, min(self._first_seen_from(num_computed_tokens, max(windows)),
                                                    num_blocks))

    def _first_seen_from(self, position: int, window: int) -> int:
        return first_visible_block(position, window, self.block_size)

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (evicted ones excluded)."""
        return sum(block != EVICTED for block in self._block_tables.get(request_id, []))

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks, in token order."""
        return self._block_tables.get(request_id, [])

    def free(self, request_id: str) -> None:
        """Return the request's blocks to the pool, last block first so shared prefixes are evicted last."""
        self._block_hashes.pop(request_id, None)
        self._uncacheable.discard(request_id)
        self._num_evicted.pop(request_id, None)
        self._num_slid.pop(request_id, None)
        table = self._block_tables.pop(request_id, None)
        if table:
            self.pool.free([block for block in reversed(table) if block != EVICTED])
