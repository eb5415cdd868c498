"""The linear-method seam: how a `Linear` holds its weights and computes x @ W^T + b."""

from __future__ import annotations

import torch
from torch import nn


class LinearMethod:
    """Creates a layer's parameters, prepares them once after loading, and applies the layer.

    Chosen once per model at load (by the platform and the quantization config), never per call:
    `Linear.forward` is one call to `apply`.
    """

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """Register the layer's parameters (with their weight loaders)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Derive whatever `apply` reads from the loaded checkpoint tensors (default: nothing)."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        raise NotImplementedError

    def derived_bytes(self, layer: nn.Module) -> int:
        """Bytes held beside the layer's parameters (packed copies); counted in the model's memory."""
        return 0
