"""Per-request block tables on top of the block pool (pure Python: the scheduler's view of KV memory)."""

from __future__ import annotations

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.prefix_cache import CachedPrefix, hash_block
from kvserve.kv.sinks_window import EVICTED, SinksWindow


class KVCacheManager:
    """Maps each request to the blocks that hold its tokens' keys and values, sharing cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None, num_sinks: int = 0) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = None if window is None else SinksWindow(window, num_sinks, block_size)
        self._num_evicted: dict[str, int] = {}  # blocks evicted per request (they follow the sink blocks)
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

    def find_cached_prefix(self, token_ids: list[int]) -> CachedPrefix:
        """The longest run of leading full blocks already cached; at least one token is left to compute."""
        prefix = CachedPrefix()
        if not self.enable_prefix_caching:
            return prefix
        size = self.block_size
        parent = None
        for index in range((len(token_ids) - 1) // size):
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            block_hash = hash_block(parent, tokens)
            block = self.pool.prefix_cache.lookup(block_hash, parent, tokens)
            if block is None:
                break
            prefix.blocks.append(block)
            prefix.hashes.append(block_hash)
            parent = block_hash
        self.num_prefix_queries += len(token_ids)
        self.num_prefix_hits += len(prefix.blocks) * size
        return prefix

    def allocate_slots(self, request_id: str, num_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        """Grow the request's table to `num_tokens` tokens, starting from `prefix` for a new request.

        Returns False, changing nothing, when the pool is short.
        """
        table = self._block_tables.get(request_id, [])
        shared = prefix.blocks if prefix and not table else []
        # Reviving a cached block that sits on the free list takes it from the free pool too.
        revived = sum(1 for block in shared if self.pool.ref_count(block) == 0)
        missing = max(self.blocks_for_tokens(num_tokens) - len(table) - len(shared), 0)
        if missing + revived > self.pool.num_free_blocks:
            return False
        if shared:
            self.pool.touch(shared)
            self._block_hashes[request_id] = list(prefix.hashes)
        table = self._block_tables.setdefault(request_id, [])
        table.extend(shared)
        table.extend(self.pool.allocate(missing))
        return True

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that became full (their K/V written) in the prefix cache."""
        if not self.enable_prefix_caching or request_id in self._uncacheable:
            return
        hashes = self._block_hashes.setdefault(request_id, [])
        table = self._block_tables[request_id]
        size = self.block_size
        for index in range(len(hashes), num_computed_tokens // size):
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            parent = hashes[-1] if hashes else None
            block_hash = hash_block(parent, tokens)
            if not self.pool.prefix_cache.insert(table[index], block_hash, parent, tokens):
                self._uncacheable.add(request_id)  # a collision: later blocks would chain from it
                return
            hashes.append(block_hash)

    def evict_outside_window(self, request_id: str, num_computed_tokens: int) -> None:
        """Free the blocks that no query from position `num_computed_tokens` on can see (sinks stay)."""
        if self.window is None:
            return
        num_evicted = self._num_evicted.get(request_id, 0)
        dead = self.window.evict(self._block_tables.get(request_id, []), num_evicted, num_computed_tokens)
        if dead:
            self.pool.free(dead)
            self._num_evicted[request_id] = num_evicted + len(dead)

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (evicted ones excluded)."""
        return len(self._block_tables.get(request_id, [])) - self._num_evicted.get(request_id, 0)

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks, in token order."""
        return self._block_tables.get(request_id, [])

    def free(self, request_id: str) -> None:
        """Return the request's blocks to the pool, last block first so shared prefixes are evicted last."""
        self._block_hashes.pop(request_id, None)
        self._uncacheable.discard(request_id)
        self._num_evicted.pop(request_id, None)
        table = self._block_tables.pop(request_id, None)
        if table:
            self.pool.free([block for block in reversed(table) if block != EVICTED])
