"""Float32 CPU matmuls on oneDNN with weights reordered once into its blocked layout ("packed").

Why: a batch of decodes is a skinny matmul (2-64 rows against a 576 x 3072 weight). MKL re-packs the
weight on every call, so those steps ran near GEMV speed per row. A weight packed once at load time
lets oneDNN's kernels stream it as is: 30 SmolLM2 layers (2-core CPU, cold cache) took 26 vs 45 ms at
16 rows, 75-80 vs 98-107 ms at 64, and 538 vs 598-719 ms at 512 (the best of torch and numpy). At one
row numpy's OpenBLAS GEMV stays faster (17 vs 21 ms), and the compiled GEMV faster still, which is why
the CPU linear method keeps the plain weight too.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 and Arm wheels do)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> an opaque oneDNN tensor holding it in its blocked layout (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] -> x @ W^T + bias [T, out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
