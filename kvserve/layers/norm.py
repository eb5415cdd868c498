"""RMSNorm."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormKernel = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x, weight, eps) -> normed x
# (x, residual, weight, eps) -> (normed x + residual, x + residual): the residual add fused into the norm
AddNormKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] -> same shape, on torch in float32 like the reference."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    normed = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale; `kernel` (and `add_kernel`, where the platform fuses the
    residual add into the norm) are set once at load by the platform."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernel: NormKernel = rms_norm
        self.add_kernel: AddNormKernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> same shape."""
        return self.kernel(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) for x, residual [T, hidden]."""
        if self.add_kernel is not None:
            return self.add_kernel(x, residual, self.weight, self.eps)
        summed = x + residual
        return self.kernel(summed, self.weight, self.eps), summed
