"""Linear layers that store their weight transposed, for fast decode on CPU."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers import host_blas, native_ops, onednn

# Row counts for which the transposed product wins (measured on the 2-core CPU, 30 SmolLM2-sized layers).
_SKINNY_ROWS = (8, 64)


class Linear(nn.Module):
    """y = x @ W^T + b, with W kept as `weight_t` [in, out].

    With one token per request the matmul is a matrix-vector product bound by reading W. Streaming
    the rows of W^T (an axpy per input feature) ran about 1.45x faster than F.linear's dot products
    over the rows of W on the 2-core CPU (a microbenchmark of 30 SmolLM2-sized layers, cold cache).
    On a float32 CPU model, `pack_for_onednn` adds a second copy of W in oneDNN's layout for steps of
    several rows (see layers/onednn.py); single rows read the plain weight, on kvserve's compiled GEMV when
    `use_native_gemv` is set (layers/native_ops.py).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # W in oneDNN's blocked layout, float32 CPU only
        self.use_native_gemv = False  # float32 CPU only: one-row inputs go to native_ops.gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        if self.use_native_gemv and x.shape[0] == 1 and x.dim() == 2:
            y = native_ops.gemv(x, self.weight_t)
        elif host_blas.takes(x):
            y = host_blas.matmul(x, self.weight_t)
        elif self.packed is not None and x.shape[0] > 1:
            return onednn.linear(x, self.packed, self.bias)
        elif _SKINNY_ROWS[0] < x.shape[0] <= _SKINNY_ROWS[1]:
            # A batch of decodes: MKL runs W @ x^T (out features as the long side) about 1.4x faster
            # than x @ W^T for 9-64 rows (slower from ~96 on); the transposes are views, the copy is [T, out].
            y = (self.weight_t.t() @ x.t()).t().contiguous()
        else:
            y = x @ self.weight_t
        return y if self.bias is None else y.add_(self.bias)

    def pack_for_onednn(self) -> int:
        """Keep a oneDNN-packed copy of the weight (call after loading); returns its bytes."""
        self.packed = onednn.pack(self.weight_t)
        return self.packed.numel() * self.packed.element_size()

    def load_weight(self, weight: torch.Tensor, rows: slice | None = None) -> None:
        """Copy a checkpoint weight [out, in] (or the `rows` of a fused output) into place."""
        target = self.weight_t if rows is None else self.weight_t[:, rows]
        _check_shape(target.t(), weight)
        target.copy_(weight.t())

    def load_bias(self, bias: torch.Tensor, rows: slice | None = None) -> None:
        """Copy a checkpoint bias [out] (or the `rows` of a fused output) into place."""
        if self.bias is None:
            raise ValueError("checkpoint has a bias for a layer without one")
        target = self.bias if rows is None else self.bias[rows]
        _check_shape(target, bias)
        target.copy_(bias)


def _check_shape(target: torch.Tensor, tensor: torch.Tensor) -> None:
    if target.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(target.shape)}")
