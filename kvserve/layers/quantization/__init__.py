"""Linear methods: how a Linear layer stores and applies its weights (plain now; quantized formats beside)."""

from kvserve.layers.quantization.base import LinearMethod
from kvserve.layers.quantization.unquantized import UnquantizedLinearMethod

__all__ = ["LinearMethod", "UnquantizedLinearMethod"]
