"""Group-wise asymmetric int4 weights, quantized at load by round-to-nearest (RTN).

`weight` [out, in / 2] uint8 holds the codes two per byte (int_ops.pack_nibbles), `weight_scale` and
`weight_min` [out, in / group] float32 the groups' scale and -zero * scale: W = q * scale + min. Each checkpoint
tensor (each shard of a fused layer) is quantized on its own rows as it arrives. The AWQ method loads AutoAWQ
checkpoints into the same layout and computes with this method's kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import torch
from torch import nn

from kvserve.layers import int_ops
from kvserve.layers.quantization.base import LinearMethod
from kvserve.layers.quantization.rtn import check_group_size, default_group_size, quantize_int4_groups
from kvserve.layers.quantization.weight_only import WeightOnlyLinearMethod

INT4_PARAMETERS = ("weight", "weight_scale", "weight_min")


class Int4LinearMethod(WeightOnlyLinearMethod):
    """W[o, i] = q[o, i] * weight_scale[o, g] + weight_min[o, g], g = i // group_size; y = x @ W^T + b."""

    weight_format = "int4"

    def __init__(self, dense: LinearMethod, kernels: ModuleType | None, group_size: int | None = None) -> None:
        super().__init__(dense, kernels)
        self.group_size = group_size  # None: per layer, the largest of 128, 64, 32 dividing its input size

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """Empty codes, scales and minima (filled by quantizing the checkpoint's float weight), `bias`."""
        group_size = self.group_size or default_group_size(in_features)
        check_group_size(in_features, group_size)
        self.create_bias(layer, out_features, bias)
        weight = self.add_parameter(layer, "weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        weight.weight_loader = lambda param, tensor, shard_id: self._load_weight(layer, param, tensor, shard_id)
        for name in INT4_PARAMETERS[1:]:
            self.add_parameter(layer, name, torch.zeros(out_features, in_features // group_size))

    @staticmethod
    def _load_weight(layer: nn.Module, param: nn.Parameter, tensor: torch.Tensor,
                     shard_id: int | None) -> Iterable[str]:
        """Quantize a float weight [rows, in] into the shard's rows of codes, scales and minima."""
        if not tensor.is_floating_point():
            raise ValueError(f"is {tensor.dtype}; int4 quantizes float weights at load (AutoAWQ checkpoints "
                             "load with quantization='awq')")
        if tensor.dim() != 2 or tensor.shape[1] != layer.in_features:
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected [rows, {layer.in_features}]")
        groups = quantize_int4_groups(tensor, layer.in_features // layer.weight_scale.shape[1])
        layer.weight_loader(param, int_ops.pack_nibbles(groups.q), shard_id)
        layer.weight_loader(layer.weight_scale, groups.scale, shard_id)
        layer.weight_loader(layer.weight_min, groups.minimum(), shard_id)
        return INT4_PARAMETERS[1:]

    def kernel_matmul(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """The platform's int4 kernel."""
        self.kernels.int4_matmul(x, layer.weight, layer.weight_scale, layer.weight_min, out)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """q * scale + min, float32 [out, in]."""
        return int_ops.dequantize_int4(layer.weight, layer.weight_scale, layer.weight_min)
