"""Plain weights in the model dtype, on any device: F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.layers.quantization.base import LinearMethod
from kvserve.loader.model_loader import set_weight_loader


class UnquantizedLinearMethod(LinearMethod):
    """W [out, in] (+ bias [out]) as in the checkpoint; y = F.linear(x, W, b)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """`weight` [out, in] and optional `bias` [out], each loaded whole or by output shard."""
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        for param in (layer.weight, layer.bias):
            if param is not None:
                set_weight_loader(param, layer.weight_loader, len(layer.output_sizes))

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        return F.linear(x, layer.weight, layer.bias)
