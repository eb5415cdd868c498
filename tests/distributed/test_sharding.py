"""The sharding rules, without processes: every head, row and column lands on exactly one rank (KV heads on every
rank that needs them), and a rank's part of a checkpoint tensor is the slice those rules name."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from kvserve.distributed import parallel_state
from kvserve.distributed.parallel_state import TensorParallelGroup
from kvserve.distributed.sharding import even_split, padded_split, shard_heads
from kvserve.layers.embedding import LMHead, VocabEmbedding
from kvserve.layers.linear import column_parallel, row_parallel
from kvserve.loader.gguf import GgufTensor


@pytest.mark.parametrize(("count", "world_size"), [(9, 2), (8, 4), (3, 2), (5, 5), (1536, 2)])
def test_even_split_covers_every_unit_once(count, world_size):
    ranges = [even_split(count, rank, world_size) for rank in range(world_size)]
    assert [unit for start, length in ranges for unit in range(start, start + length)] == list(range(count))
    assert max(length for _, length in ranges) - min(length for _, length in ranges) <= 1


@pytest.mark.parametrize(("count", "world_size"), [(49153, 2), (10, 4), (8, 2)])
def test_padded_split_gives_equal_parts_covering_the_vocabulary(count, world_size):
    parts = [padded_split(count, rank, world_size) for rank in range(world_size)]
    assert len({padded for _, padded in parts}) == 1
    assert [unit for (start, length), _ in parts for unit in range(start, start + length)] == list(range(count))


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "world_size"),
                         [(9, 3, 2), (8, 2, 2), (8, 2, 4), (4, 1, 2), (4, 1, 4), (6, 3, 3), (4, 4, 2), (16, 8, 3)])
def test_heads_split_in_whole_groups(num_heads, num_kv_heads, world_size):
    """Each query head on exactly one rank, beside the KV head it reads."""
    group = num_heads // num_kv_heads
    seen = []
    for rank in range(world_size):
        shard = shard_heads(num_heads, num_kv_heads, rank, world_size)
        queries = range(shard.q_start, shard.q_start + shard.num_heads)
        kv_heads = range(shard.kv_start, shard.kv_start + shard.num_kv_heads)
        assert shard.num_heads > 0 and {q // group for q in queries} == set(kv_heads)
        seen.extend(queries)
    assert sorted(seen) == list(range(num_heads))


def test_heads_that_cannot_be_split_are_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide or be a multiple of "
                                         "num_key_value_heads=2"):
        shard_heads(8, 2, 0, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 is more than the 2 attention heads allow"):
        shard_heads(2, 1, 0, 4)


@pytest.fixture
def rank_one_of_two(monkeypatch):
    """Build layers as rank 1 of 2 (no process group: only construction and loading are exercised)."""
    monkeypatch.setattr(parallel_state, "_group", TensorParallelGroup(1, 2))


def test_a_rank_keeps_its_rows_and_columns(rank_one_of_two):
    weight, bias = torch.arange(48.0).view(8, 6), torch.arange(8.0)
    column = column_parallel(6, [(4, 2), (6, 2)], bias=True)  # rows 4-5 of shard 0, rows 6-7 of shard 1
    assert torch.equal(column.checkpoint_part("weight", weight, 0), weight[4:6])
    assert torch.equal(column.checkpoint_part("weight", weight, 1), weight[6:8])
    assert torch.equal(column.checkpoint_part("bias", bias, 1), bias[6:8])
    row = row_parallel((3, 3), 8, bias=True)
    assert torch.equal(row.checkpoint_part("weight", weight, None), weight[:, 3:])
    assert torch.equal(row.checkpoint_part("bias", bias, None), torch.zeros(8))  # the driver adds it, once
    with pytest.raises(ValueError, match="is a 'qweight' tensor, which tensor parallelism cannot split"):
        row.checkpoint_part("qweight", weight, None)


def test_a_vocabulary_slice_is_padded_to_an_equal_part(rank_one_of_two):
    embedding, head = VocabEmbedding(5, 4), LMHead(5, 4)
    assert (embedding.vocab_start, embedding.vocab_length, embedding.out_features) == (3, 2, 3)
    weight = torch.arange(20.0).view(5, 4)
    part = head.checkpoint_part("weight", weight, None)
    assert torch.equal(part, torch.cat([weight[3:], torch.zeros(1, 4)]))


def test_gguf_rows_and_whole_blocks_of_columns():
    # Q8_0: blocks of 32 values in 34 bytes; 2 rows of 64 values.
    data = torch.arange(2 * 68, dtype=torch.uint8).view(2, 68)
    tensor = GgufTensor(data, GGMLQuantizationType.Q8_0, (2, 64))
    assert torch.equal(tensor.narrow(0, 1, 1).data, data[1:])
    columns = tensor.narrow(1, 32, 32)
    assert columns.shape == (2, 32) and torch.equal(columns.data, data[:, 34:])
    with pytest.raises(ValueError, match="Q8_0, whose blocks of 32 columns cannot be split at columns 16..48"):
        tensor.narrow(1, 16, 32)
    padded = tensor.pad_rows(3)
    assert padded.shape == (3, 64) and not padded.data[2].any()
