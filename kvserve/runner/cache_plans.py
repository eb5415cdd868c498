"""Per-step index plans for the int4 residual and the sinks + window cache, built once and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.attention.backend import Int4WritePlan, ResidualTails
from kvserve.kv.kv_manager import EVICTED


class ResidualSlots:
    """Hands each running request one full-precision residual slot of the int4 cache."""

    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        """Slots not held by any request."""
        return len(self._free)

    def slot(self, request_id: str) -> int:
        """The request's slot, assigned on first use."""
        if request_id not in self._slot_of:
            if not self._free:
                raise RuntimeError("no free int4 residual slot: more running requests than max_num_seqs")
            self._slot_of[request_id] = self._free.pop()
        return self._slot_of[request_id]

    def release(self, request_id: str) -> None:
        """Return a finished or preempted request's slot (its contents are rewritten before being read again)."""
        slot = self._slot_of.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)


@dataclass
class StepSpan:
    """One request's share of the packed step, as the int4 plan needs it."""

    first_row: int  # its first row in the packed batch
    start: int  # position of its first new token (tokens already cached)
    count: int  # new tokens
    block_table: list[int]
    slot: int  # its residual slot


def int4_write_plan(spans: list[StepSpan], num_decodes: int, decode_columns: list[int], block_size: int,
                    device: torch.device) -> Int4WritePlan:
    """Which blocks complete this step (and where their tokens come from), and which rows go to the residual.

    A block completes when the step writes its last position; its earlier tokens wait in the request's residual
    slot (only the first block of a step can have any: later ones start inside the step).
    `decode_columns[i]`: the column of decode i's newest block in its (held) block table.
    """
    size = block_size
    flush_blocks: list[int] = []
    from_residual: tuple[list[int], list[int]] = ([], [])
    from_step: tuple[list[int], list[int]] = ([], [])
    keep_rows: list[int] = []
    keep_slots: list[int] = []
    tails: tuple[list[int], list[int], list[int]] = ([], [], [])
    for index, span in enumerate(spans):
        end = span.start + span.count
        for block in range(span.start // size, end // size):
            base, block_start = len(flush_blocks) * size, block * size
            flush_blocks.append(span.block_table[block])
            num_earlier = max(span.start - block_start, 0)
            from_residual[0].extend(range(base, base + num_earlier))
            from_residual[1].extend(range(span.slot * size, span.slot * size + num_earlier))
            from_step[0].extend(range(base + num_earlier, base + size))
            first = span.first_row + block_start + num_earlier - span.start
            from_step[1].extend(range(first, first + size - num_earlier))
        tail_start = max(span.start, end // size * size)
        keep_rows.extend(range(span.first_row + tail_start - span.start, span.first_row + span.count))
        keep_slots.extend(span.slot * size + position % size for position in range(tail_start, end))
        if index < num_decodes and end % size:
            for target, value in zip(tails, (index, decode_columns[index], span.slot), strict=True):
                target.append(value)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return Int4WritePlan(
        flush_blocks=tensor(flush_blocks),
        flush_from_residual=(tensor(from_residual[0]), tensor(from_residual[1])),
        flush_from_step=(tensor(from_step[0]), tensor(from_step[1])),
        residual_rows=tensor(keep_rows),
        residual_slots=tensor(keep_slots),
        decode_tails=ResidualTails(*(tensor(values) for values in tails)),
    )


def prefill_tail(span: StepSpan, num_held_blocks: int, block_size: int,
                 device: torch.device) -> ResidualTails | None:
    """The residual overlay of one prefill: its last held block, when that block is incomplete."""
    if (span.start + span.count) % block_size == 0:
        return None
    return ResidualTails(*(torch.tensor([value], dtype=torch.long, device=device)
                           for value in (0, num_held_blocks - 1, span.slot)))


def held_blocks(block_table: list[int]) -> tuple[list[int], list[int]]:
    """(blocks still held, their indices in the table): a window's evicted blocks are left out."""
    held = [(block, index) for index, block in enumerate(block_table) if block != EVICTED]
    return [block for block, _ in held], [index for _, index in held]


def key_positions(block_indices: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    """Token positions of the held blocks' slots, in gathered order: [len(block_indices) * block_size]."""
    indices = torch.tensor(block_indices, dtype=torch.long, device=device)
    return (indices[:, None] * block_size + torch.arange(block_size, device=device)).flatten()


def window_visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int, num_sinks: int) -> torch.Tensor:
    """key_pos [..., L], query_pos [..., n] -> [..., n, L] bool: a sink, or one of the query's last `window` tokens."""
    keys, queries = key_pos[..., None, :], query_pos[..., :, None]
    return (keys <= queries) & ((keys < num_sinks) | (keys > queries - window))
