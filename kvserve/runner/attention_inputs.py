"""Builds the step's CommonAttentionMetadata from plain per-request lists, once per step, for every layer.

All integer inputs go to the device as one tensor (one host-to-device copy) that is then viewed as positions,
slots, offsets, lengths and the padded block table: building them request by request would cost a tensor op
per request. Active KV layouts (sinks + window, int4 residual) add their parts.
"""

from __future__ import annotations

import torch

from kvserve.attention.backend import CommonAttentionMetadata
from kvserve.kv.int4_residual import Int4ResidualLayout
from kvserve.kv.kv_groups import first_visible_block
from kvserve.kv.sinks_window import held_blocks
from kvserve.kv.window_layout import SinksWindowLayout


def build_common_metadata(req_ids: list[str], num_computed_tokens: list[int], num_new_tokens: list[int],
                          block_tables: list[list[int]], block_size: int, device: torch.device,
                          window: SinksWindowLayout | None = None,
                          int4: Int4ResidualLayout | None = None,
                          sliding_window: int | None = None) -> CommonAttentionMetadata:
    """The common metadata of one step over requests given in batch order, single-token requests first.

    `block_tables[i]`: request i's logical table (with a window, evicted entries are EVICTED). Raises a
    ValueError when a table cannot hold its request's tokens (kernels trust the tables). A sliding-window KV
    group's tables are gathered from the first block the window sees (the blocks before it may be gone).
    """
    num_reqs = len(req_ids)
    num_decodes = 0
    while num_decodes < num_reqs and num_new_tokens[num_decodes] == 1:
        num_decodes += 1
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    for start, count, table in zip(num_computed_tokens, num_new_tokens, block_tables, strict=True):
        end = start + count
        if end > len(table) * block_size:
            raise ValueError(f"a request attends {end} tokens but its block table holds {len(table) * block_size}")
        positions.extend(range(start, end))
        # Plain ints: a tensor per request would cost more than the arithmetic for decodes.
        slots.extend(table[pos // block_size] * block_size + pos % block_size for pos in range(start, end))
        query_start_loc.append(query_start_loc[-1] + count)
        seq_lens.append(end)
    held_columns: list[list[int]] = []
    gathered = block_tables  # the blocks attention reads, in order: with a window only the held ones
    if window is not None:
        held = [held_blocks(table) for table in block_tables]
        gathered, held_columns = [blocks for blocks, _ in held], [columns for _, columns in held]
    first_blocks = []
    if sliding_window is not None:
        first_blocks = [first_visible_block(start, sliding_window, block_size) for start in num_computed_tokens]
        gathered = [table[first:] for table, first in zip(block_tables, first_blocks, strict=True)]
    num_blocks = [len(blocks) for blocks in gathered]
    max_blocks = max(num_blocks, default=0)
    first_keys = [first * block_size for first in first_blocks]
    flat = positions + slots + query_start_loc + seq_lens + num_computed_tokens + first_keys
    for blocks in gathered:
        flat.extend(blocks)
        flat.extend([0] * (max_blocks - len(blocks)))
    num_tokens = query_start_loc[-1]
    data = torch.tensor(flat, dtype=torch.long, device=device)
    position_t, slot_t, start_t, len_t, computed_t, first_key_t, table_t = data.split(
        [num_tokens, num_tokens, num_reqs + 1, num_reqs, num_reqs, len(first_keys), num_reqs * max_blocks])
    common = CommonAttentionMetadata(
        positions=position_t, slot_mapping=slot_t, query_start_loc=start_t, seq_lens=len_t,
        num_computed_tokens=computed_t, block_table=table_t.view(num_reqs, max_blocks), num_reqs=num_reqs,
        num_decode_tokens=num_decodes, block_size=block_size, query_start_loc_host=query_start_loc,
        seq_lens_host=seq_lens, num_blocks_host=num_blocks,
        max_query_len=max(num_new_tokens, default=0))
    if sliding_window is not None:
        common.sliding_window = sliding_window
        common.first_key_position, common.first_key_position_host = first_key_t, first_keys
    if window is not None:
        common.window = window.step_metadata(position_t, num_decodes, held_columns)
    if int4 is not None:
        common.int4 = int4.step_plan(req_ids, query_start_loc, num_computed_tokens, block_tables, num_blocks,
                                     num_decodes, device)
    return common


def single_token_rows(req_ids: list[str], num_computed_tokens: list[int], num_new_tokens: list[int],
                      block_tables: list[list[int]], split: list[bool]
                      ) -> tuple[list[str], list[int], list[int], list[list[int]]]:
    """The same four lists with each request i where `split[i]` as `num_new_tokens[i]` single-token rows of its
    sequence, row j attending to the tokens before it and itself (every row's K/V is written before any row
    attends), so that a few tokens of one request (a verify step's drafts) run on the decode kernels."""
    if not any(split):
        return req_ids, num_computed_tokens, num_new_tokens, block_tables
    ids, computed, counts, tables = [], [], [], []
    for req_id, start, count, table, one_by_one in zip(req_ids, num_computed_tokens, num_new_tokens, block_tables,
                                                       split, strict=True):
        rows = count if one_by_one else 1
        ids.extend([req_id] * rows)
        computed.extend(range(start, start + count) if one_by_one else [start])
        counts.extend([1] * count if one_by_one else [count])
        tables.extend([table] * rows)
    return ids, computed, counts, tables
