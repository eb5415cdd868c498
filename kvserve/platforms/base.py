"""The platform seam and its plain-torch default (any device torch runs on)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvserve.config import EngineConfig
from kvserve.kv.kv_cache import available_memory_bytes, host_memory_bytes
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.linear import Linear
from kvserve.layers.norm import AddNormKernel, NormKernel, RMSNorm, rms_norm
from kvserve.layers.quantization import WEIGHT_ONLY_METHODS, LinearMethod, UnquantizedLinearMethod, weight_only_method
from kvserve.layers.quantization.checkpoint_config import checkpoint_quantization
from kvserve.loader.gguf import GgufSource

if TYPE_CHECKING:
    from kvserve.runner.cuda_graphs import CapturedStep, StepFunction
    from kvserve.runner.model_runner import ModelRunner

# Layer attributes holding a torch function that a platform may replace with a fused kernel (fused_kernels).
_KERNEL_ATTRIBUTES = ("activation", "rotary_kernel")


class Platform:
    """Device-specific choices, made once: plain torch everywhere, a KV budget from free memory."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.load.device)

    def configure(self) -> None:
        """Apply the process-wide settings this platform needs (see kvserve/platforms/__init__.py)."""

    def restore(self) -> None:
        """Undo what `configure` changed, where it can be undone."""

    def resolve_quantization(self, requested: str | None, source: object, dtype: torch.dtype) -> str | None:
        """The weight format a model loads in: a quantized checkpoint's own (AWQ, kvserve int8); else `requested`,
        or by default gguf for a .gguf file where this platform computes on it; None (dequantized) otherwise."""
        declared = checkpoint_quantization(getattr(source, "hf_config", None) or {}, getattr(source, "path", ""))
        if declared is not None:
            if requested not in (None, declared):
                raise ValueError(f"quantization={requested!r}: the checkpoint is {declared}-quantized (config.json "
                                 f"quantization_config); load it with quantization={declared!r} or leave it unset")
            return declared
        if requested == "awq":
            raise ValueError("quantization='awq' loads AutoAWQ checkpoints (config.json quantization_config."
                             "quant_method 'awq'); make one with `kvserve quantize --method awq`, or quantize at "
                             "load with quantization='int4' (round-to-nearest)")
        if requested == "none":
            return None
        if requested == "gguf" and not isinstance(source, GgufSource):
            raise ValueError("quantization='gguf' needs a .gguf model file")
        if requested == "gguf" and not source.computes_on_blocks:
            raise ValueError(f"quantization='gguf': {source.architecture} GGUF files run dequantized; leave it unset")
        if requested is None:
            return ("gguf" if isinstance(source, GgufSource) and source.computes_on_blocks
                    and self.computes_on_gguf(dtype) else None)
        return requested

    def computes_on_gguf(self, dtype: torch.dtype) -> bool:
        """Whether GGUF block formats can be computed on here (the CPU's compiled kernels)."""
        return False

    def linear_method(self, dtype: torch.dtype, quantization: str | None = None) -> LinearMethod:
        """The method every Linear of a `dtype` model computes with: plain, or a weight-only integer one on this
        platform's `weight_only_kernels` (or the dequantized weight: any device, not fast)."""
        if quantization in WEIGHT_ONLY_METHODS:
            return weight_only_method(quantization, UnquantizedLinearMethod(), self.weight_only_kernels(dtype),
                                      self.config.load.quantization_group_size)
        if quantization is not None:
            raise ValueError(f"quantization {quantization!r} is not supported on {self.device.type} with {dtype}")
        return UnquantizedLinearMethod()

    def weight_only_kernels(self, dtype: torch.dtype) -> ModuleType | None:
        """The module whose int8_matmul / int4_matmul serve the weight-only methods for a `dtype` model here;
        None: they multiply with the dequantized weight."""
        return None

    def norm_kernel(self, dtype: torch.dtype) -> NormKernel:
        """The RMSNorm implementation for a `dtype` model."""
        return rms_norm

    def add_norm_kernel(self, dtype: torch.dtype) -> AddNormKernel | None:
        """A kernel adding the residual inside RMSNorm for a `dtype` model, or None (torch adds, then norms)."""
        return None

    def fused_kernels(self, dtype: torch.dtype) -> dict[Callable, Callable]:
        """Replacements for the torch functions layers hold as kernel attributes (GatedMLP.activation,
        LlamaAttention.rotary_kernel), keyed by the function they replace."""
        return {}

    def prepare_model(self, model: nn.Module, dtype: torch.dtype, quantization: str | None = None) -> None:
        """Before loading: give every Linear (embeddings too) this platform's method for the weight format, every
        RMSNorm its kernels, and every layer's kernel attributes their fused replacements; a tied LM head then
        shares the embedding's new weight again."""
        method, kernel = self.linear_method(dtype, quantization), self.norm_kernel(dtype)
        add_kernel, replacements = self.add_norm_kernel(dtype), self.fused_kernels(dtype)
        lm_head = getattr(model, "lm_head", None)
        for module in model.modules():
            if isinstance(module, Linear):
                module.set_method(method.lm_head_method() if module is lm_head else method)
            elif isinstance(module, RMSNorm):
                module.kernel, module.add_kernel = kernel, add_kernel
            for name in _KERNEL_ATTRIBUTES:
                function = getattr(module, name, None)
                if function in replacements:
                    setattr(module, name, replacements[function])
        if hasattr(model, "tie_weights"):
            model.tie_weights()

    def fused_decode(self, model: nn.Module, attention_backend: object, kv_caches: list) -> object | None:
        """What runs whole decode steps of `model` in one call over these caches, or None (the modules do)."""
        return None

    def decode_graph_capture(self) -> Callable[[StepFunction], CapturedStep] | None:
        """How decode steps are captured for replay (runner/cuda_graphs.py), or None: every step runs eagerly."""
        return None

    def step_context(self, num_tokens: int) -> AbstractContextManager[None]:
        """What the runner enters around a step of `num_tokens` tokens."""
        return nullcontext()

    def kv_cache_budget(self, runner: ModelRunner, specs: list[KVCacheSpec], max_model_len: int) -> int:
        """KV-cache bytes when kv_cache_memory is unset: kv_cache_memory_fraction of the host's total memory, the
        same from run to run (of the free memory it had moved by 2.5x between runs), but never more than half of
        what is free now. The pages are touched as blocks are first used, not up front."""
        share = host_memory_bytes() * self.config.cache.kv_cache_memory_fraction
        return int(min(share, available_memory_bytes(self.device) / 2))
