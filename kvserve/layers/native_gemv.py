"""Batch-1 decode matmuls (one row against a float32 weight) on kvserve's compiled GEMV (native/gemv.c).

It runs on torch's OpenMP threads, so unlike numpy's OpenBLAS (host_blas.py, the fallback without a C
compiler) it needs no second thread pool and torch keeps all its threads during the step.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kvserve import native


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The GEMV library with its signatures set, or None if it cannot be built here."""
    kernel = native.load("gemv")
    if kernel is not None:
        kernel.gemv_f32.restype = None
        kernel.gemv_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
        kernel.gemv_threads.restype = ctypes.c_int
    return kernel


def available() -> bool:
    """Whether the compiled GEMV can run here."""
    return load_kernel() is not None


def gemv(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [1, in] @ weight_t [in, out] -> [1, out]; float32, CPU, weight_t contiguous."""
    kernel = load_kernel()
    num_in, num_out = weight_t.shape
    x = x.contiguous()
    y = x.new_empty(1, num_out)
    partial = x.new_empty(kernel.gemv_threads() * num_out)
    kernel.gemv_f32(x.data_ptr(), weight_t.data_ptr(), y.data_ptr(), partial.data_ptr(), num_in, num_out)
    return y
