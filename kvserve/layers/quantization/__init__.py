"""Linear methods: how a Linear layer stores and applies its weights (plain, GGUF blocks, int8, int4, AWQ)."""

from types import ModuleType

from kvserve.layers.quantization.awq import AwqLinearMethod
from kvserve.layers.quantization.base import LinearMethod
from kvserve.layers.quantization.int4 import Int4LinearMethod
from kvserve.layers.quantization.int8 import Int8LinearMethod
from kvserve.layers.quantization.unquantized import UnquantizedLinearMethod

WEIGHT_ONLY_METHODS = ("int8", "int4", "awq")  # the `quantization` values weight_only_method makes


def weight_only_method(quantization: str, dense: LinearMethod, kernels: ModuleType | None,
                       group_size: int | None = None) -> LinearMethod:
    """The int8, int4 (RTN, `group_size`) or AWQ method, with `dense` for the embedding and the LM head and
    `kernels` (int_ops, triton_int, or None for the dequantized weight)."""
    if quantization == "int8":
        return Int8LinearMethod(dense, kernels)
    if quantization == "int4":
        return Int4LinearMethod(dense, kernels, group_size)
    if quantization == "awq":
        return AwqLinearMethod(dense, kernels)
    raise ValueError(f"no weight-only method {quantization!r}; there are {list(WEIGHT_ONLY_METHODS)}")


__all__ = ["WEIGHT_ONLY_METHODS", "LinearMethod", "UnquantizedLinearMethod", "weight_only_method"]
