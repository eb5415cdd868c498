"""What the weight-only integer methods (int8, int4, AWQ) share: float activations against integer weights on
the platform's kernels or, without them, the dequantized weight; embeddings and the LM head stay on the dense
method."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.layers.quantization.base import LinearMethod
from kvserve.loader.model_loader import set_weight_loader


class WeightOnlyLinearMethod(LinearMethod):
    """Integer weights, activations in the model dtype. Subclasses hold the weights (`create_weights`) and name
    the kernel call (`kernel_matmul`) and the dequantization (`dequantize`) of their format.

    `kernels`: the module whose `int8_matmul` / `int4_matmul` compute on the integer weights, chosen by the
    platform: layers/int_ops.py (compiled, CPU, float32 activations) or layers/triton_int.py (CUDA); None: every
    call multiplies with the dequantized weight (any device and dtype: correct, not fast). `dense` computes the
    vocabulary embedding and the LM head, as AutoAWQ and vLLM leave them unquantized.
    """

    def __init__(self, dense: LinearMethod, kernels: ModuleType | None) -> None:
        self.dense = dense
        self.kernels = kernels

    def kernel_matmul(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [T, out_features] = x [T, in] @ W^T on `kernels`."""
        raise NotImplementedError

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight as float32 [out, in]."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        if self.kernels is None:
            return F.linear(x, self.dequantize(layer).to(x.dtype), layer.bias)
        y = x.new_empty(x.shape[0], layer.out_features)
        self.kernel_matmul(layer, x, y)
        return y if layer.bias is None else y.add_(layer.bias)

    def embedding_method(self) -> LinearMethod:
        """The dense method's: embeddings keep their float rows."""
        return self.dense.embedding_method()

    def lm_head_method(self) -> LinearMethod:
        """The dense method."""
        return self.dense

    @staticmethod
    def create_bias(layer: nn.Module, out_features: int, bias: bool) -> None:
        """A float `bias` [out] in the model dtype (that of the dense weight being replaced), loaded as usual."""
        weight = getattr(layer, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.get_default_dtype()
        layer.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        if layer.bias is not None:
            set_weight_loader(layer.bias, layer.weight_loader, len(layer.output_sizes))

    @staticmethod
    def add_parameter(layer: nn.Module, name: str, tensor: torch.Tensor) -> nn.Parameter:
        """Register `tensor` as the layer's parameter `name`, filled by output shard (Linear.weight_loader)."""
        param = nn.Parameter(tensor, requires_grad=False)
        setattr(layer, name, param)
        set_weight_loader(param, layer.weight_loader, len(layer.output_sizes))
        return param
