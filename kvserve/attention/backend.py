"""Attention metadata: everything a paged-attention kernel needs about one step, built once per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class ResidualTails:
    """int4 caches: which gathered blocks are a request's incomplete tail, read from its full-precision residual."""

    rows: torch.Tensor  # [k] long: request row in the gathered batch
    blocks: torch.Tensor  # [k] long: column of the tail block in that row's block table
    slots: torch.Tensor  # [k] long: the request's residual slot


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
    decode_tails: ResidualTails


@dataclass
class WindowMetadata:
    """Attention sinks + sliding window (StreamingLLM): query q sees keys k < num_sinks and q - W < k <= q.

    Keys are cached rotated at their true positions, so a query and its window keep true relative distances.
    A sink must instead look as far away as in a compacted cache (sinks at 0..S-1, the window right after them,
    the query at S + W - 1): the sink scores use the query rotated back by delta = max(0, q - (S + W - 1)),
    i.e. placed at position S + W - 1. Sinks sit in the first columns of every gathered table.
    """

    num_sinks: int
    window: int
    sink_rotation: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [T, 1, D] of the angle -delta per query
    decode_in_window: torch.Tensor  # [num_decodes] bool: delta > 0, the sinks are shifted for this query


@dataclass
class PrefillSeq:
    """One request computing several tokens this step (a prompt, a prompt chunk, or a recompute)."""

    query_start: int  # offset of its first query token in the packed batch
    query_len: int  # tokens computed this step
    seq_len: int  # tokens in the cache after this step (cached prefix + query_len)
    block_table: torch.Tensor  # [num_blocks] long (with a window: only the blocks still held, in order)
    residual: ResidualTails | None = None  # int4: its tail block, if incomplete
    key_mask: torch.Tensor | None = None  # with a window: [query_len, num_blocks * bs] bool, True = visible


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer.

    The packed batch holds `num_decodes` single-token queries first, then the prefill tokens.
    """

    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot (block * block_size + offset) per token
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long, padded with 0
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size] bool: key position < seq_len
    prefills: list[PrefillSeq]
    int4: Int4WritePlan | None = None  # set when the cache is int4
    window: WindowMetadata | None = None  # set when the engine runs with sinks + a sliding window
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] long: each decode's position + 1 (set by the runner)


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache and attends over it."""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 key_cache: torch.Tensor, value_cache: torch.Tensor,
                 metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] -> output [T, Hq, D]."""
        ...
