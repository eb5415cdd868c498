"""Float32 linear layers on the CPU, tuned for a few cores (each fast path has its own engine option).

- One row (batch-1 decode): kvserve's compiled GEMV on the plain [out, in] weight (layers/native_ops.py,
  `cpu_native_kernels`); without it, inside a host-BLAS step, numpy's OpenBLAS (layers/host_blas.py,
  `cpu_blas_max_tokens`).
- Several rows (batched decode, prefill): a copy of the weight packed once for oneDNN (layers/onednn.py,
  `cpu_packed_weights`); without it MKL, with W @ x^T for 9-64 rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.layers import host_blas, native_ops, onednn
from kvserve.layers.host_blas import HostBlasStep
from kvserve.layers.quantization.unquantized import UnquantizedLinearMethod

# Row counts for which MKL's W @ x^T (out features as the long side) beat x @ W^T: about 1.4x for 9-64 rows,
# slower from ~96 (the 2-core CPU, 30 SmolLM2-sized layers). The transposes are views; the copy is [T, out].
_SKINNY_ROWS = (8, 64)


class CpuLinearMethod(UnquantizedLinearMethod):
    """Checkpoint-layout float32 weights on the CPU, with the fast paths chosen at construction."""

    def __init__(self, use_gemv: bool, use_packed: bool, blas_step: HostBlasStep) -> None:
        self.use_gemv = use_gemv  # one row on the compiled GEMV
        self.use_packed = use_packed  # several rows on the oneDNN-packed copy
        self.blas_step = blas_step  # active: this step's matmuls on OpenBLAS

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Pack a oneDNN copy of W (the plain weight stays: one-row steps and tied embeddings read it)."""
        layer.packed_weight = onednn.pack(layer.weight) if self.use_packed else None

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        rows = x.shape[0]
        if rows == 1 and self.use_gemv:
            y = native_ops.gemv(x, layer.weight)
        elif self.blas_step.active:
            y = host_blas.matmul(x, layer.weight)
        elif rows > 1 and self.use_packed:
            return onednn.linear(x, layer.packed_weight, layer.bias)
        elif _SKINNY_ROWS[0] < rows <= _SKINNY_ROWS[1]:
            y = (layer.weight @ x.t()).t().contiguous()  # [out, in] @ [in, T] -> [T, out]
        else:
            return F.linear(x, layer.weight, layer.bias)
        return y if layer.bias is None else y.add_(layer.bias)

    def embedding_method(self) -> UnquantizedLinearMethod:
        """The plain method: an embedding needs no packed copy (a tied LM head packs its own)."""
        return UnquantizedLinearMethod()

    def derived_bytes(self, layer: nn.Module) -> int:
        """Bytes of the oneDNN-packed copy."""
        packed = layer.packed_weight
        return 0 if packed is None else packed.numel() * packed.element_size()
