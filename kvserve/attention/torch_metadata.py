"""The pure-torch backend's per-step metadata (a list of prefills plus a dense decode mask), derived from the
runner's common metadata once per step and shared by every layer (the CPU backend uses it too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.attention.backend import CommonAttentionMetadata
from kvserve.kv.int4_residual import Int4WritePlan, ResidualColumns, ResidualTails
from kvserve.kv.window_layout import WindowMetadata, key_positions, window_visible


@dataclass
class PrefillSeq:
    """One request computing several tokens this step (a prompt, a prompt chunk, or a recompute)."""

    query_start: int  # offset of its first query token in the packed batch
    query_len: int  # tokens computed this step
    seq_len: int  # tokens in the cache after this step (cached prefix + query_len)
    block_table: torch.Tensor  # [num_blocks] long (with a window: only the blocks still held, in order)
    residual: ResidualTails | None = None  # int4: its tail block, if incomplete
    key_mask: torch.Tensor | None = None  # with a window: [query_len, num_blocks * bs] bool, True = visible
    first_key: int = 0  # a sliding-window group: the position of the first gathered key


@dataclass
class TorchAttentionMetadata:
    """torch_ref's per-step inputs. The packed batch holds `num_decodes` single-token queries first."""

    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot (block * block_size + offset) per token
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long, padded with 0
    decode_seq_lens: torch.Tensor  # [num_decodes] long: each decode's position + 1
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool (None: a kernel decodes)
    prefills: list[PrefillSeq]
    int4: Int4WritePlan | None = None  # set when the cache is int4
    window: WindowMetadata | None = None  # set when the engine runs with sinks + a sliding window
    # A sliding-window KV group, for kernels: each decode attends to its table's keys [start, end) (long [B]).
    decode_key_starts: torch.Tensor | None = None
    decode_key_ends: torch.Tensor | None = None
    # An int4 cache, for kernels: each decode's incomplete block, read from its residual slot (long [B] each).
    decode_residual: ResidualColumns | None = None


def build_torch_metadata(common: CommonAttentionMetadata, with_decode_mask: bool = True) -> TorchAttentionMetadata:
    """Split the common metadata into the decode batch and one PrefillSeq per multi-token request.

    `with_decode_mask` False: the decodes run on a kernel that reads seq_lens, so the dense mask is not built.
    """
    num_decodes = common.num_decode_tokens
    max_decode_blocks = max(common.num_blocks_host[:num_decodes], default=0)
    # Only as wide as the longest decode's table: a long prompt in the same step must not widen the gather.
    decode_tables = common.block_table[:num_decodes, :max_decode_blocks].contiguous()
    decode_seq_lens = common.seq_lens[:num_decodes]
    mask = _decode_mask(common, decode_tables, decode_seq_lens) if with_decode_mask else None
    metadata = TorchAttentionMetadata(
        slot_mapping=common.slot_mapping, num_decodes=num_decodes, decode_block_tables=decode_tables,
        decode_seq_lens=decode_seq_lens, decode_mask=mask,
        prefills=[prefill_seq(common, row) for row in range(num_decodes, common.num_reqs)],
        int4=common.int4, window=common.window)
    if common.sliding_window is not None and not with_decode_mask:
        metadata.decode_key_starts, metadata.decode_key_ends = sliding_key_ranges(common)
    if common.int4 is not None and not with_decode_mask:
        metadata.decode_residual = ResidualColumns.of(common.int4.decode_tails, num_decodes, decode_tables.device,
                                                      torch.long)
    return metadata


def sliding_key_ranges(common: CommonAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decode's visible keys as [start, end) columns of its gathered table: end = seq_len - first key,
    start = end - window, at least 0."""
    num_decodes = common.num_decode_tokens
    ends = [length - first for length, first in zip(common.seq_lens_host[:num_decodes],
                                                    common.first_key_position_host[:num_decodes], strict=True)]
    starts = [max(end - common.sliding_window, 0) for end in ends]
    ranges = torch.tensor([starts, ends], dtype=torch.long, device=common.block_table.device)
    return ranges[0], ranges[1]


def _decode_mask(common: CommonAttentionMetadata, tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, max_blocks * block_size] bool: which gathered key columns each decode sees."""
    size, device, window = common.block_size, tables.device, common.window
    num_decodes, max_blocks = tables.shape
    if common.sliding_window is not None:  # the tables start at each decode's first visible block
        key_pos = torch.arange(max_blocks * size, device=device) + common.first_key_position[:num_decodes, None]
        query_pos = seq_lens[:, None] - 1
        return sliding_visible(key_pos, query_pos, common.sliding_window)[:, None, None, :]
    if window is None:
        key_pos = torch.arange(max_blocks * size, device=device)
        return (key_pos[None, :] < seq_lens[:, None])[:, None, None, :]
    # Padding columns get a position past every query: never visible.
    far = max(common.seq_lens_host[:num_decodes], default=0)
    key_pos = torch.stack([torch.cat([key_positions(columns, size, device),
                                      torch.full(((max_blocks - len(columns)) * size,), far, device=device)])
                           for columns in window.held_columns[:num_decodes]]) if num_decodes else \
        torch.zeros(0, 0, dtype=torch.long, device=device)
    query_pos = common.num_computed_tokens[:num_decodes]
    return window_visible(key_pos, query_pos[:, None], window.window, window.num_sinks)[:, None]


def prefill_seq(common: CommonAttentionMetadata, row: int) -> PrefillSeq:
    """A multi-token request's attention inputs: its row of the block table, int4 tail and window mask."""
    query_start = common.query_start_loc_host[row]
    query_len = common.query_start_loc_host[row + 1] - query_start
    seq_len = common.seq_lens_host[row]
    seq = PrefillSeq(query_start, query_len, seq_len, common.block_table[row, :common.num_blocks_host[row]])
    if common.int4 is not None:
        seq.residual = common.int4.prefill_tails[row - common.num_decode_tokens]
    window = common.window
    if window is not None:
        device = common.block_table.device
        query_pos = torch.arange(seq_len - query_len, seq_len, device=device)
        seq.key_mask = window_visible(key_positions(window.held_columns[row], common.block_size, device), query_pos,
                                      window.window, window.num_sinks)
    sliding = common.sliding_window
    if sliding is not None:
        seq.first_key = common.first_key_position_host[row]
        if seq.first_key or seq_len > sliding:  # else plain causal attention is the same
            device = common.block_table.device
            key_pos = torch.arange(seq.first_key, seq.first_key + len(seq.block_table) * common.block_size,
                                   device=device)
            query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
            seq.key_mask = sliding_visible(key_pos[None, :], query_pos, sliding)
    return seq


def sliding_visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys a sliding-window query sees: q - window < k <= q (broadcasting key_pos and query_pos)."""
    return (key_pos <= query_pos) & (key_pos > query_pos - window)
