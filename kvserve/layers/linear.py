"""The linear layer: checkpoint-layout weights, computed by the linear method chosen at load."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers.quantization.base import LinearMethod
from kvserve.layers.quantization.unquantized import UnquantizedLinearMethod
from kvserve.loader.model_loader import check_shape


class Linear(nn.Module):
    """y = x @ W^T + b with W [out, in] as in the checkpoint; `method` holds and applies the weights.

    `output_sizes` splits the output of a fused projection (QKV, gate/up) into the checkpoint's shards, in
    order: shard i fills output rows sum(output_sizes[:i]) onwards. The method is UnquantizedLinearMethod until
    the platform sets the one for its device and dtype (`set_method`), before the weights are loaded.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 output_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = output_sizes or [out_features]
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"output_sizes {self.output_sizes} do not add up to out_features={out_features}")
        self.method: LinearMethod = UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        return self.method.apply(self, x)

    def set_method(self, method: LinearMethod) -> None:
        """Compute with `method`; the platform calls this before loading. A method of another weight format
        replaces the parameters with its own (created on the same device)."""
        if method.weight_format != self.method.weight_format:
            device = self.weight.device
            method.create_weights(self, self.in_features, self.out_features, self.bias is not None)
            self.to(device)
        self.method = method

    def process_weights_after_loading(self) -> None:
        """Let the method derive its copies (packed layouts) from the loaded weights."""
        self.method.process_weights_after_loading(self)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
        """Copy a checkpoint weight [out, in] or bias [out], or shard `shard_id` of a fused one, into place."""
        target = param.data
        if shard_id is not None:
            start = sum(self.output_sizes[:shard_id])
            target = target.narrow(0, start, self.output_sizes[shard_id])  # output rows of this shard
        check_shape(target, tensor)
        target.copy_(tensor)
