"""Small CPU steps run their float32 matmuls through numpy's OpenBLAS, with torch's thread pool stood down.

Why: on the 2-core CPU this engine is tuned on, OpenBLAS's float32 GEMV streams weights at ~28 GB/s where
torch's MKL reaches ~18 GB/s (30 SmolLM2 layers: 15.5 vs 25.5 ms per token). But the two libraries keep
separate thread pools whose idle workers spin: with both at 2 threads on 2 cores, a decode step ran ~6x
slower. So a step on this path runs torch's own ops on one thread and leaves the cores to OpenBLAS.
That pays while those ops are small. With oneDNN-packed weights (layers/onednn.py) taking every step of
two or more rows, only batch-1 decode is left here (`cpu_blas_max_tokens` 1), and only as the fallback for
when kvserve's compiled GEMV (layers/native_ops.py, ~20% faster) cannot be built.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from threadpoolctl import threadpool_limits

_state = threading.local()  # .active: a host-BLAS step is running on this thread


def set_blas_threads(num_threads: int) -> None:
    """Give OpenBLAS (numpy's BLAS) the engine's thread count."""
    threadpool_limits(limits=num_threads, user_api="blas")


@contextmanager
def host_blas_step() -> Iterator[None]:
    """Within: float32 CPU `Linear`s use OpenBLAS and torch runs single-threaded (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    _state.active = True
    try:
        yield
    finally:
        _state.active = False
        torch.set_num_threads(previous)


def takes(x: torch.Tensor) -> bool:
    """Whether x @ W goes to OpenBLAS: inside a host-BLAS step, for float32 on the CPU."""
    return getattr(_state, "active", False) and x.dtype == torch.float32 and x.device.type == "cpu"


def matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight_t [in, out] -> [T, out], through numpy (both share memory with the tensors)."""
    return torch.from_numpy(np.matmul(x.numpy(), weight_t.numpy()))
