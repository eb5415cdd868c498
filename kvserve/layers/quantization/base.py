"""The linear-method seam: how a `Linear` holds its weights and computes x @ W^T + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """Creates a layer's parameters, prepares them once after loading, and applies the layer.

    Chosen once per model at load (by the platform and the quantization config), never per call:
    `Linear.forward` is one call to `apply`. Methods that share `weight_format` hold the same parameters, so a
    layer switches between them without re-creating its weights.
    """

    weight_format = "dense"  # weight [out, in] in the model dtype (+ bias [out])

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """Register the layer's parameters (with their weight loaders)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Derive whatever `apply` reads from the loaded checkpoint tensors (default: nothing)."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        raise NotImplementedError

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] of the weight -> [T, in] (a vocabulary embedding is an LM head's weight read by row)."""
        return F.embedding(ids, layer.weight)

    def embedding_method(self) -> LinearMethod:
        """The method for an embedding of this format (which only looks rows up: no packed copies)."""
        return self

    def lm_head_method(self) -> LinearMethod:
        """The method for the LM head (the weight-only integer methods keep it, like the embedding, dense)."""
        return self

    def derived_bytes(self, layer: nn.Module) -> int:
        """Bytes held beside the layer's parameters (packed copies); counted in the model's memory."""
        return 0
