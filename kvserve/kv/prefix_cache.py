"""Content-addressed lookup of full KV blocks, for reusing a shared prompt prefix (pure Python).

A full block is named by a hash chained from its parent block's hash and its own token ids, so
equal hashes mean equal prefixes up to that block. Hashes can collide, so a lookup also compares
the stored token ids: a collision costs a cache miss, never a wrong block.
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

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)


class PrefixCache:
    """Maps block hashes to blocks that hold exactly those tokens' keys and values."""

    def __init__(self) -> None:
        self._blocks: dict[int, tuple[int, int | None, BlockTokens]] = {}  # hash -> (block, parent, tokens)
        self._hash_of_block: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, block_hash: int, parent_hash: int | None, token_ids: BlockTokens) -> int | None:
        """The block caching these tokens after this parent, or None (also on a hash collision)."""
        entry = self._blocks.get(block_hash)
        if entry is None or entry[1] != parent_hash or entry[2] != token_ids:
            return None
        return entry[0]

    def insert(self, block: int, block_hash: int, parent_hash: int | None, token_ids: BlockTokens) -> bool:
        """Remember that `block` holds these tokens after this parent; the first block under a hash wins.

        Returns False on a hash collision (the hash names other tokens): the caller must then stop
        caching this sequence, since its later blocks would chain from a hash that names other tokens.
        """
        entry = self._blocks.get(block_hash)
        if entry is not None:
            return entry[1] == parent_hash and entry[2] == token_ids
        if block not in self._hash_of_block:
            self._blocks[block_hash] = (block, parent_hash, token_ids)
            self._hash_of_block[block] = block_hash
        return True

    def evict(self, block: int) -> None:
        """Forget `block` (it is about to be overwritten); a no-op for uncached blocks."""
        block_hash = self._hash_of_block.pop(block, None)
        if block_hash is not None:
            del self._blocks[block_hash]
