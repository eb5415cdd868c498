"""int8 weights, one symmetric scale per output channel: `weight` int8 [out, in], `weight_scale` float32 [out].

A dense checkpoint is quantized at load, each tensor (each shard of a fused layer) on its own rows as it
arrives, so no float copy of the model is held. A kvserve int8 checkpoint (`kvserve quantize --method int8`)
stores these two tensors and loads as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvserve.layers import int_ops
from kvserve.layers.quantization.rtn import quantize_int8_rows
from kvserve.layers.quantization.weight_only import WeightOnlyLinearMethod


class Int8LinearMethod(WeightOnlyLinearMethod):
    """W = weight * weight_scale[:, None]; y = x @ W^T + b."""

    weight_format = "int8"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """`weight` int8 [out, in] (a float checkpoint weight is quantized into it), `weight_scale` [out], `bias`."""
        self.create_bias(layer, out_features, bias)
        weight = self.add_parameter(layer, "weight", torch.empty(out_features, in_features, dtype=torch.int8))
        weight.weight_loader = lambda param, tensor, shard_id: self._load_weight(layer, param, tensor, shard_id)
        self.add_parameter(layer, "weight_scale", torch.ones(out_features))

    @staticmethod
    def _load_weight(layer: nn.Module, param: nn.Parameter, tensor: torch.Tensor,
                     shard_id: int | None) -> Iterable[str]:
        """An int8 tensor is copied (its scale is a checkpoint tensor of its own); a float one [rows, in] is
        quantized row by row, which fills `weight_scale` as well."""
        if tensor.dtype == torch.int8:
            layer.weight_loader(param, tensor, shard_id)
            return ()
        if not tensor.is_floating_point():
            raise ValueError(f"is {tensor.dtype}; int8 layers load int8 or float weights")
        q, scale = quantize_int8_rows(tensor)
        layer.weight_loader(param, q, shard_id)
        layer.weight_loader(layer.weight_scale, scale, shard_id)
        return ("weight_scale",)

    def kernel_matmul(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """The platform's int8 kernel."""
        self.kernels.int8_matmul(x, layer.weight, layer.weight_scale, out)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """weight * weight_scale, float32 [out, in]."""
        return int_ops.dequantize_int8(layer.weight, layer.weight_scale)
