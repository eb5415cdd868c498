"""The runner's per-step CommonAttentionMetadata builder, on plain lists: offsets, lengths, slots, padded
tables, and the parts the KV layouts add (sinks + window held columns and rotation, the int4 write plan)."""

from __future__ import annotations

import pytest
import torch

from kvserve.attention.backend import AttentionRequirements
from kvserve.attention.torch_backend import TorchAttentionBackend
from kvserve.kv.int4_residual import Int4ResidualLayout
from kvserve.kv.sinks_window import EVICTED, SinksWindow
from kvserve.kv.window_layout import SinksWindowLayout
from kvserve.runner.attention_inputs import build_common_metadata

CPU = torch.device("cpu")


def test_two_decodes_and_a_prompt_chunk():
    # block_size 4. a: decode at position 5 (block 3, offset 1); b: decode at 8 (block 6, offset 0);
    # c: a 4-token chunk at positions 2..5 over blocks 4 and 1.
    common = build_common_metadata(["a", "b", "c"], [5, 8, 2], [1, 1, 4], [[7, 3], [2, 9, 6], [4, 1]], 4, CPU)
    assert common.positions.tolist() == [5, 8, 2, 3, 4, 5]
    assert common.slot_mapping.tolist() == [3 * 4 + 1, 6 * 4, 4 * 4 + 2, 4 * 4 + 3, 1 * 4, 1 * 4 + 1]
    assert common.query_start_loc.tolist() == common.query_start_loc_host == [0, 1, 2, 6]
    assert common.seq_lens.tolist() == common.seq_lens_host == [6, 9, 6]
    assert common.num_computed_tokens.tolist() == [5, 8, 2]
    assert common.block_table.tolist() == [[7, 3, 0], [2, 9, 6], [4, 1, 0]]
    assert common.num_blocks_host == [2, 3, 2]
    assert (common.num_reqs, common.num_decode_tokens, common.max_query_len, common.num_tokens) == (3, 2, 4, 6)
    assert common.window is None and common.int4 is None


def test_torch_metadata_is_derived_from_it():
    common = build_common_metadata(["a", "b", "c"], [5, 2, 10], [1, 1, 6], [[7, 3], [2], [4, 1, 8, 5]], 4, CPU)
    backend = TorchAttentionBackend(AttentionRequirements(CPU, "float32", use_window=False, use_mla=False))
    metadata = backend.build_metadata(common)
    assert metadata.num_decodes == 2
    assert metadata.decode_block_tables.tolist() == [[7, 3], [2, 0]]  # as wide as the decodes need, not the prompt
    assert metadata.decode_seq_lens.tolist() == [6, 3]
    assert metadata.decode_mask[:, 0, 0].tolist() == [[True] * 6 + [False] * 2, [True] * 3 + [False] * 5]
    (prefill,) = metadata.prefills
    assert (prefill.query_start, prefill.query_len, prefill.seq_len) == (2, 6, 16)
    assert prefill.block_table.tolist() == [4, 1, 8, 5]


def test_a_table_too_short_for_its_tokens_is_refused():
    with pytest.raises(ValueError, match="a request attends 9 tokens but its block table holds 8"):
        build_common_metadata(["a"], [5], [4], [[1, 2]], 4, CPU)


def test_window_gathers_only_the_held_blocks():
    # Blocks of 2, 2 sinks, a window of 4: the blocks at columns 1 and 2 were evicted.
    policy = SinksWindow(window=4, num_sinks=2, block_size=2)

    def rotation(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # records the offsets it was given
        return delta.float()[:, None, None], delta.float()[:, None, None] + 100

    layout = SinksWindowLayout(policy, rotation)
    # a decodes position 10: the blocks at columns 1 and 2 (positions 2..5) are out of its window and evicted.
    assert policy.first_live_block(10) == 3
    table = [10, EVICTED, EVICTED, 11, 12, 14]
    common = build_common_metadata(["a", "b"], [10, 1], [1, 1], [table, [3]], 2, CPU, window=layout)
    assert common.slot_mapping.tolist() == [14 * 2, 3 * 2 + 1]  # the logical table places the new tokens
    assert common.block_table.tolist() == [[10, 11, 12, 14], [3, 0, 0, 0]]
    assert common.num_blocks_host == [4, 1]
    window = common.window
    assert window.held_columns == [[0, 3, 4, 5], [0]]
    # delta = max(0, position - (S + W - 1)): 10 - 5 = 5 for a, 0 for b; the sink rotation is by -delta.
    cos, minus_sin = window.sink_rotation
    assert cos.flatten().tolist() == [5.0, 0.0] and minus_sin.flatten().tolist() == [-105.0, -100.0]
    assert window.decode_in_window.tolist() == [True, False]
    backend = TorchAttentionBackend(AttentionRequirements(CPU, "float32", use_window=True, use_mla=False))
    mask = backend.build_metadata(common).decode_mask[:, 0, 0]
    # Gathered key positions of a: 0 1 | 6 7 | 8 9 | 10 11. At 10 it sees its sinks and 7..10; b (at 1) sees
    # 0 and 1 of its one block, and never its padding.
    assert mask[0].tolist() == [True, True, False, True, True, True, True, False]
    assert mask[1].tolist() == [True, True] + [False] * 6


def test_int4_plan_flushes_completed_blocks_and_keeps_the_tails():
    layout = Int4ResidualLayout(num_slots=2, block_size=4)
    # a: decode at position 7 completes block 6 (3 tokens wait in its residual slot 0);
    # b: a 6-token prompt fills block 8 and leaves 2 tokens of block 9 in its residual slot 1.
    common = build_common_metadata(["a", "b"], [7, 0], [1, 6], [[5, 6], [8, 9]], 4, CPU, int4=layout)
    plan = common.int4
    assert plan.flush_blocks.tolist() == [6, 8]
    assert [t.tolist() for t in plan.flush_from_residual] == [[0, 1, 2], [0, 1, 2]]
    assert [t.tolist() for t in plan.flush_from_step] == [[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]]
    assert plan.residual_rows.tolist() == [5, 6] and plan.residual_slots.tolist() == [4, 5]
    assert plan.decode_tails.rows.tolist() == []  # a's block is complete: nothing read from the residual
    (tail,) = plan.prefill_tails
    assert (tail.rows.tolist(), tail.blocks.tolist(), tail.slots.tolist()) == ([0], [1], [1])
    layout.release("a")
    assert layout.slots.num_free == 1
