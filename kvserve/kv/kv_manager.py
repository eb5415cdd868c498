"""Per-request block tables on top of the block pool (pure Python: the scheduler's view of KV memory)."""

from __future__ import annotations

from kvserve.kv.block_pool import BlockPool


class KVCacheManager:
    """Maps each request to the blocks that hold its tokens' keys and values."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}

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

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's block table to hold `num_tokens` tokens; False (and no change) if the pool is short."""
        table = self._block_tables.setdefault(request_id, [])
        missing = self.blocks_for_tokens(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.pool.num_free_blocks:
            return False
        table.extend(self.pool.allocate(missing))
        return True

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks, in token order."""
        return self._block_tables.get(request_id, [])

    def free(self, request_id: str) -> None:
        """Return all of the request's blocks to the pool (a no-op for an unknown request)."""
        table = self._block_tables.pop(request_id, None)
        if table:
            self.pool.free(table)
