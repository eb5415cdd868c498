"""This process's place in the tensor-parallel group, and the collectives the sharded layers call.

One group per process, set when the process joins it (`init_tensor_parallel`), as torch.distributed's own default
group is: the layers read it while they are built (which rows to keep) and while they run (reduce, gather). A
process that never joins is rank 0 of 1, and every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def is_driver(self) -> bool:
        """Rank 0: the process that schedules, samples and holds the logits."""
        return self.rank == 0


_group = TensorParallelGroup()
_object_group: dist.ProcessGroup | None = None  # plain data travels over gloo even when tensors go over NCCL

# Workers wait for the driver's next step for as long as the server is idle: a long timeout. A dead peer is not
# waited for: its closed socket fails the collective at once (and the driver checks its workers before each step).
IDLE_TIMEOUT = timedelta(days=30)


def tp_group() -> TensorParallelGroup:
    """This process's tensor-parallel rank and group size."""
    return _group


def init_tensor_parallel(rank: int, world_size: int, init_method: str = "env://", backend: str = "gloo") -> None:
    """Join the group (gloo on CPU, nccl on CUDA) as `rank` of `world_size`."""
    global _group, _object_group
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=IDLE_TIMEOUT)
        _object_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if backend != "gloo" else None
    _group = TensorParallelGroup(rank, world_size)


def destroy_tensor_parallel() -> None:
    """Leave the group (this process is rank 0 of 1 again)."""
    global _group, _object_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group, _object_group = TensorParallelGroup(), None
_object_group: dist.ProcessGroup | None = None  # plain data travels over gloo even when tensors go over NCCL


def all_reduce(partial: torch.Tensor) -> torch.Tensor:
    """Sum every rank's `partial` (same shape on all), in place; the sum."""
    if _group.world_size > 1:
        dist.all_reduce(partial)
    return partial


def all_gather(part: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `part` (same shape on all), in rank order, on every rank."""
    if _group.world_size == 1:
        return [part]
    part = part.contiguous()
    parts = [torch.empty_like(part) for _ in range(_group.world_size)]
    dist.all_gather(parts, part)
    return parts


def broadcast_object(obj: object = None) -> object:
    """The driver's `obj` on every rank (pickled; plain data such as a SchedulerOutput)."""
    if _group.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_object_group)
    return box[0]
