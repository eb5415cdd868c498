"""Which part of each weight a tensor-parallel rank keeps (Megatron's split): contiguous, balanced ranges.

Counts need not divide evenly: 9 query heads in 3 KV groups over 2 ranks are 6 + 3 (two KV heads and one). Every
range is in whole units (heads, rows), so each rank computes whole heads and the sums over ranks are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.distributed.parallel_state import tp_group

Range = tuple[int, int]  # (start, length)


def even_split(count: int, rank: int, world_size: int) -> Range:
    """Rank `rank`'s share of `count` units: the first `count % world_size` ranks take one more."""
    base, extra = divmod(count, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def padded_split(count: int, rank: int, world_size: int) -> tuple[Range, int]:
    """A share of equal size on every rank (a vocabulary: the driver gathers equal parts): rank's (start,
    length) of the real units, and the padded length every rank holds."""
    padded = -(-count // world_size)
    start = min(rank * padded, count)
    return (start, min(padded, count - start)), padded


@dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads [q_start, q_start + num_heads), KV heads likewise."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Split attention heads so that each rank holds whole GQA groups: with at least as many KV heads as ranks,
    KV heads (with their query groups) are split; with fewer, each KV head is replicated on world_size /
    num_kv_heads ranks, which split its query group (MQA: every rank holds the one KV head)."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= world_size:
        kv_start, kv_count = even_split(num_kv_heads, rank, world_size)
        return HeadShard(kv_start * group, kv_count * group, kv_start, kv_count)
    if world_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={world_size} must divide or be a multiple of num_key_value_heads="
                         f"{num_kv_heads}")
    ranks_per_kv = world_size // num_kv_heads
    if group < ranks_per_kv:
        raise ValueError(f"tensor_parallel_size={world_size} is more than the {num_heads} attention heads allow "
                         f"(each rank needs a query head)")
    kv_head = rank // ranks_per_kv
    q_start, q_count = even_split(group, rank % ranks_per_kv, ranks_per_kv)
    return HeadShard(kv_head * group + q_start, q_count, kv_head, 1)


def local_heads(num_heads: int, num_kv_heads: int) -> HeadShard:
    """This rank's attention heads (all of them without tensor parallelism)."""
    tp = tp_group()
    return shard_heads(num_heads, num_kv_heads, tp.rank, tp.world_size)


def local_range(count: int) -> Range:
    """This rank's share of `count` units (an MLP's intermediate size)."""
    tp = tp_group()
    return even_split(count, tp.rank, tp.world_size)
