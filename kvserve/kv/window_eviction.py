"""Which block-table columns the sinks + sliding-window policy takes back (pure Python).

The KV manager applies the rule to free blocks; the runner applies the same rule to its own copy of each block
table, so evictions never have to cross the scheduler→runner contract (see engine/sched_output.py).
"""

from __future__ import annotations

from dataclasses import dataclass

EVICTED = -1  # a block-table entry whose block left the sliding window and went back to the pool


@dataclass(frozen=True)
class WindowEviction:
    """StreamingLLM: keep the blocks of the first `num_sinks` tokens and of the last `window` ones."""

    window: int
    num_sinks: int
    block_size: int

    def evict(self, block_table: list[int], num_evicted: int, num_computed_tokens: int) -> list[int]:
        """Mark EVICTED, in place, the columns no query from position `num_computed_tokens` on can see (the sink
        blocks stay); returns their block ids, last column first. `num_evicted`: columns marked before."""
        # Query q sees keys > q - window: a block is dead once its last position is <= first query - window.
        first_live = (num_computed_tokens - self.window + 1) // self.block_size
        start = -(-self.num_sinks // self.block_size) + num_evicted
        dead = range(start, min(first_live, len(block_table)))
        blocks = [block_table[index] for index in reversed(dead)]
        for index in dead:
            block_table[index] = EVICTED
        return blocks
