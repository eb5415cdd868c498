"""The KIVI int4 KV layout: blocks are quantized once full; each running request's newest, incomplete block
waits in a full-precision residual slot. This object hands out the slots and builds, once per step, the plan
every layer follows to write its K/V (which blocks complete and where their tokens come from)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.kv.kv_cache import residual_bytes_per_slot
from kvserve.kv.kv_spec import KVCacheSpec


@dataclass
class ResidualTails:
    """int4 caches: which gathered blocks are a request's incomplete tail, read from its full-precision residual."""

    rows: torch.Tensor  # [k] long: request row in the gathered batch
    blocks: torch.Tensor  # [k] long: column of the tail block in that row's block table
    slots: torch.Tensor  # [k] long: the request's residual slot


@dataclass
class ResidualColumns:
    """ResidualTails as the kernels read them, one entry per decode row: which block each row's request reads from
    its full-precision residual slot instead of its codes."""

    columns: torch.Tensor  # [R]: the block's column in the row's table, -1 for none
    slots: torch.Tensor  # [R]: the request's residual slot

    @classmethod
    def of(cls, tails: ResidualTails, num_rows: int, device: torch.device,
           dtype: torch.dtype = torch.int32) -> ResidualColumns:
        """The tails of rows `tails.rows`; the other rows have none."""
        columns = torch.full((num_rows,), -1, dtype=dtype, device=device)
        slots = torch.zeros(num_rows, dtype=dtype, device=device)
        columns[tails.rows] = tails.blocks.to(dtype)
        slots[tails.rows] = tails.slots.to(dtype)
        return cls(columns, slots)


@dataclass
class Int4WritePlan:
    """int4 caches: how this step's K/V reach the cache (shared by every layer).

    Blocks that become full this step are assembled from the residual (their earlier tokens) and the step's
    rows, quantized per channel and stored; the tokens of still-incomplete blocks go to the residual.
    """

    flush_blocks: torch.Tensor  # [C] long: blocks completed this step
    flush_from_residual: tuple[torch.Tensor, torch.Tensor]  # (row in the [C * bs] assembly, residual flat slot)
    flush_from_step: tuple[torch.Tensor, torch.Tensor]  # (row in the [C * bs] assembly, packed step row)
    residual_rows: torch.Tensor  # [t] long: packed step rows kept in full precision
    residual_slots: torch.Tensor  # [t] long: their slot * block_size + offset in the residual
    decode_slots: torch.Tensor  # [num_decodes] long: each decode's residual slot (the fused step writes there)
    decode_tails: ResidualTails
    prefill_tails: list[ResidualTails | None]  # per multi-token request: its tail block, if incomplete


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


def num_residual_slots(specs: list[KVCacheSpec], max_num_seqs: int) -> int:
    """Residual slots the cache needs: one per running request when any layer is int4, else none."""
    return max_num_seqs if any(spec.dtype == "int4" for spec in specs) else 0


def residual_bytes(specs: list[KVCacheSpec], block_size: int, model_dtype: torch.dtype, num_slots: int) -> int:
    """Bytes the residual slots take beside the blocks (what the engine's budget sets aside)."""
    return num_slots * residual_bytes_per_slot(specs, block_size, model_dtype)


class Int4ResidualLayout:
    """The int4 layout's runner side: the residual slots and each step's write plan."""

    def __init__(self, num_slots: int, block_size: int) -> None:
        self.slots = ResidualSlots(num_slots)
        self.block_size = block_size

    def release(self, request_id: str) -> None:
        """A finished or preempted request gives its slot back."""
        self.slots.release(request_id)

    def step_plan(self, req_ids: list[str], query_start_loc: list[int], num_computed_tokens: list[int],
                  block_tables: list[list[int]], num_held_blocks: list[int], num_decodes: int,
                  device: torch.device) -> Int4WritePlan:
        """The step's write plan; `num_held_blocks[i]`: blocks in request i's (held) gathered table."""
        spans = [StepSpan(query_start_loc[i], num_computed_tokens[i], query_start_loc[i + 1] - query_start_loc[i],
                          block_tables[i], self.slots.slot(request_id)) for i, request_id in enumerate(req_ids)]
        decode_columns = [newest_column(span, count, self.block_size)
                          for span, count in zip(spans[:num_decodes], num_held_blocks[:num_decodes], strict=True)]
        plan = int4_write_plan(spans, num_decodes, decode_columns, self.block_size, device)
        plan.prefill_tails = [prefill_tail(span, count, self.block_size, device)
                              for span, count in zip(spans[num_decodes:], num_held_blocks[num_decodes:], strict=True)]
        return plan


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
        decode_slots=tensor([span.slot for span in spans[:num_decodes]]),
        decode_tails=ResidualTails(*(tensor(values) for values in tails)),
        prefill_tails=[],
    )


def newest_column(span: StepSpan, num_held_blocks: int, block_size: int) -> int:
    """The column of the block holding the span's last token in its (held) table: the last column, less the
    blocks allocated past it as lookahead (where a draft model writes its drafts)."""
    num_ahead = len(span.block_table) - -(-(span.start + span.count) // block_size)
    return num_held_blocks - 1 - num_ahead


def prefill_tail(span: StepSpan, num_held_blocks: int, block_size: int,
                 device: torch.device) -> ResidualTails | None:
    """The residual overlay of one prefill: the block of its last token, when that block is incomplete."""
    if (span.start + span.count) % block_size == 0:
        return None
    return ResidualTails(*(torch.tensor([value], dtype=torch.long, device=device)
                           for value in (0, newest_column(span, num_held_blocks, block_size), span.slot)))
