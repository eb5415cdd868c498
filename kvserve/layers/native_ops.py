"""Float32 CPU layer ops on kvserve's compiled kernels (kvserve/native): the batch-1 GEMV and RMSNorm.

They run on torch's OpenMP threads. The GEMV replaces numpy's OpenBLAS for one-row matmuls (host_blas.py is
its fallback without a C compiler): it needs no second thread pool, so torch keeps all its threads during
the step. RMSNorm replaces torch's composition of ~6 small ops with one pass.
"""

from __future__ import annotations

import torch

from kvserve import native


def available() -> bool:
    """Whether both kernels can run here."""
    return native.load("gemv") is not None and native.load("rms_norm") is not None


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, in] @ weight [out, in]^T -> [1, out]; float32, CPU, weight contiguous."""
    num_out, num_in = weight.shape
    x = x.contiguous()
    y = x.new_empty(1, num_out)
    native.load("gemv").gemv_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), num_in, num_out)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] -> x / sqrt(mean(x^2) + eps) * weight, same shape; float32, CPU."""
    x = x.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    native.load("rms_norm").rms_norm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    return y
