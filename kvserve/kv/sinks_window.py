"""The attention sinks + sliding window rule (StreamingLLM), in plain ints: shared by the KV manager, the engine's
budget and the runner's window layout (kv/window_layout.py), so all three agree on which blocks a request holds.

Query q sees keys k < num_sinks and q - window < k <= q. The blocks in between can never be seen again: the KV
manager frees them and marks their table entries EVICTED; the sink blocks stay first in every table.
"""

from __future__ import annotations

from dataclasses import dataclass

EVICTED = -1  # a block-table entry whose block left the sliding window and went back to the pool


@dataclass(frozen=True)
class SinksWindow:
    """Keep each request's first `num_sinks` tokens and its last `window` ones, in blocks of `block_size`."""

    window: int
    num_sinks: int
    block_size: int

    @property
    def num_sink_blocks(self) -> int:
        """Leading blocks that hold sinks (never evicted)."""
        return -(-self.num_sinks // self.block_size)

    def first_live_block(self, num_computed_tokens: int) -> int:
        """Index of the first non-sink block a query from position `num_computed_tokens` on can still see.

        Query q sees keys > q - window: a block is dead once its last position is <= first query - window.
        """
        return (num_computed_tokens - self.window + 1) // self.block_size

    def evict(self, block_table: list[int], num_evicted: int, num_computed_tokens: int) -> list[int]:
        """Mark EVICTED, in place, the columns no query from position `num_computed_tokens` on can see (the sink
        blocks stay); returns their block ids, last column first. `num_evicted`: columns marked before.

        The KV manager frees what this returns; the runner applies it to its own copy of the table, so
        evictions never cross the scheduler→runner contract (see engine/sched_output.py)."""
        start = self.num_sink_blocks + num_evicted
        dead = range(start, min(self.first_live_block(num_computed_tokens), len(block_table)))
        blocks = [block_table[index] for index in reversed(dead)]
        for index in dead:
            block_table[index] = EVICTED
        return blocks

    def max_blocks(self, max_num_batched_tokens: int, max_model_len: int) -> int:
        """Blocks one request holds at most: its sink blocks, the window plus one step's chunk, and one partial."""
        chunk = min(max_num_batched_tokens, max_model_len)
        return self.num_sink_blocks + -(-(self.window - 1 + chunk) // self.block_size) + 1


def max_blocks_per_request(window: SinksWindow | None, max_num_batched_tokens: int, max_model_len: int,
                           block_size: int) -> int:
    """Blocks one request can hold at once: its whole context, or with a window its sinks + window + chunk."""
    if window is None:
        return -(-max_model_len // block_size)
    return window.max_blocks(max_num_batched_tokens, max_model_len)


def held_blocks(block_table: list[int]) -> tuple[list[int], list[int]]:
    """(blocks still held, their columns in the table): a window's evicted blocks are left out."""
    held = [(block, column) for column, block in enumerate(block_table) if block != EVICTED]
    return [block for block, _ in held], [column for _, column in held]
