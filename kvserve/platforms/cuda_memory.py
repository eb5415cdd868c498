"""Size the CUDA KV cache: what `gpu_memory_utilization` of the GPU leaves after a worst-case step.

At start-up the runner runs one step as large as the scheduler can ever make (`max_num_batched_tokens`
of prefill, `max_num_seqs` rows of logits) over a scratch cache; torch's peak allocation then covers the
weights and every activation. The decode graphs, captured after the cache is allocated, hold a memory pool of
their own: it is measured by capturing them once over a one-block scratch cache. The KV cache gets the rest of
the allowed share:

    budget = total * gpu_memory_utilization - memory outside torch - (peak - scratch cache) - graph pool
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1 << 30


@dataclass(frozen=True)
class GpuMemory:
    """Bytes on one GPU, read right after the profiling step."""

    total: int
    outside_torch: int  # the CUDA context, other libraries and other processes
    peak_torch: int  # torch's peak allocation during the profiling step, weights included


def read_gpu_memory(device: torch.device) -> GpuMemory:
    """The device's memory after a synchronize (peak since the last reset_peak_memory_stats)."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemory(total, total - free - torch.cuda.memory_reserved(device),
                     torch.cuda.max_memory_allocated(device))


def kv_budget(memory: GpuMemory, utilization: float, scratch_bytes: int, graph_bytes: int = 0) -> int:
    """Bytes left for the KV cache; ValueError when the model, one step and the decode graphs already use the whole
    share."""
    allowed = int(memory.total * utilization)
    in_use = memory.outside_torch + memory.peak_torch - scratch_bytes + graph_bytes
    if allowed <= in_use:
        raise ValueError(
            f"gpu_memory_utilization={utilization} allows {allowed / GIB:.2f} GiB of the GPU's "
            f"{memory.total / GIB:.2f} GiB, but the weights and the largest step already use {in_use / GIB:.2f} GiB "
            f"(outside torch {memory.outside_torch / GIB:.2f} GiB, decode graphs {graph_bytes / GIB:.2f} GiB): "
            "nothing is left for the KV cache; raise gpu_memory_utilization, lower max_num_batched_tokens / "
            "max_num_seqs, or set enforce_eager")
    return allowed - in_use
