"""A pool of fixed-size KV-cache blocks with reference counts and an LRU free list (pure Python)."""

from __future__ import annotations

from collections import OrderedDict

from kvserve.kv.prefix_cache import PrefixCache


class BlockPool:
    """Hands out block ids; a block returns to the free list when its reference count drops to zero.

    Free blocks keep their contents and prefix-cache entry until they are handed out again, least
    recently freed first, so a later request with the same prefix can still reuse them.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_cache = PrefixCache()
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (cached or not)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks (reference count 1 each), evicting their cached contents."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block in blocks:
            self.prefix_cache.evict(block)
            self._ref_counts[block] = 1
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Add a reference to each (cached) block, taking free ones off the free list."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody references go to the back of the free list."""
        for block in blocks:
            if self._ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def ref_counts(self) -> list[int]:
        """Every block's reference count, by block id (a copy)."""
        return list(self._ref_counts)

    def ref_count(self, block: int) -> int:
        """Current reference count of `block`."""
        return self._ref_counts[block]
