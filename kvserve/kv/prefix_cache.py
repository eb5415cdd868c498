"""Content-addressed lookup of full KV blocks, for reusing a shared prompt prefix (pure Python).

A full block is named by a hash chained from its parent block's hash and its own token ids, so
equal hashes mean equal prefixes up to that block. Hashes can collide, so a lookup also compares
the stored token ids: a collision costs a cache miss, never a wrong block. A hybrid cache (kv/kv_groups.py)
holds one block per KV group for the same tokens: each group's is found under the hash and the group's index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BlockTokens = tuple[int, ...]


def hash_block(parent_hash: int | None, token_ids: BlockTokens) -> int:
    """The chained hash of a full block."""
    return hash((parent_hash, token_ids))


@dataclass
class CachedPrefix:
    """The leading full blocks of a sequence found in the cache, with their chained hashes."""

    blocks: list[int] = field(default_factory=list)  # a hybrid cache: one per KV group per block, interleaved
    hashes: list[int] = field(default_factory=list)  # one per block

    @property
    def num_blocks(self) -> int:
        """Leading blocks of the sequence found (each group's, in a hybrid cache)."""
        return len(self.hashes)


# A block's key: its chained hash, and for KV group g > 0 of a hybrid cache (g, hash).
BlockKey = int | tuple[int, int]


def _key(block_hash: int, group: int) -> BlockKey:
    return block_hash if group == 0 else (group, block_hash)


class PrefixCache:
    """Maps block hashes to blocks that hold exactly those tokens' keys and values."""

    def __init__(self) -> None:
        self._blocks: dict[BlockKey, tuple[int, int | None, BlockTokens]] = {}  # key -> (block, parent, tokens)
        self._hash_of_block: dict[int, BlockKey] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, block_hash: int, parent_hash: int | None, token_ids: BlockTokens, group: int = 0) -> int | None:
        """The block of KV group `group` caching these tokens after this parent, or None (also on a collision)."""
        entry = self._blocks.get(_key(block_hash, group))
        if entry is None or entry[1] != parent_hash or entry[2] != token_ids:
            return None
        return entry[0]

    def insert(self, block: int, block_hash: int, parent_hash: int | None, token_ids: BlockTokens,
               group: int = 0) -> bool:
        """Remember that `block` holds these tokens after this parent; the first block under a key wins.

        Returns False on a hash collision (the hash names other tokens): the caller must then stop
        caching this sequence, since its later blocks would chain from a hash that names other tokens.
        """
        key = _key(block_hash, group)
        entry = self._blocks.get(key)
        if entry is not None:
            return entry[1] == parent_hash and entry[2] == token_ids
        if block not in self._hash_of_block:
            self._blocks[key] = (block, parent_hash, token_ids)
            self._hash_of_block[block] = key
        return True

    def cached_blocks(self) -> list[int]:
        """The blocks that hold a cached prefix block (in use or free), in no order."""
        return list(self._hash_of_block)

    def evict(self, block: int) -> None:
        """Forget `block` (it is about to be overwritten); a no-op for uncached blocks."""
        block_hash = self._hash_of_block.pop(block, None)
        if block_hash is not None:
            del self._blocks[block_hash]
