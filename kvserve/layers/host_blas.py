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

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


class HostBlasStep:
    """Whether the running step's float32 matmuls go to OpenBLAS; one per engine, shared by its CPU linear
    methods, entered by the runner for each step of up to `max_tokens` tokens (0: never)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.active = False

    @contextmanager
    def run(self) -> Iterator[None]:
        """Within: the CPU linear methods use OpenBLAS and torch runs single-threaded (restored after)."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        self.active = True
        try:
            yield
        finally:
            self.active = False
            torch.set_num_threads(previous)


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T -> [T, out], through numpy (both share memory with the tensors)."""
    return torch.from_numpy(np.matmul(x.numpy(), weight.numpy().T))
