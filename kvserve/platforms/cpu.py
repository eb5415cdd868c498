"""The CPU: torch and OpenBLAS thread counts, glibc malloc, and the float32 fast paths (compiled kernels,
oneDNN-packed weights, the OpenBLAS fallback), each behind its engine option."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from types import ModuleType

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from kvserve.config import EngineConfig
from kvserve.distributed.parallel_state import tp_group
from kvserve.layers import gguf_ops, int_ops, native_ops, onednn
from kvserve.layers.host_blas import HostBlasStep
from kvserve.layers.norm import NormKernel
from kvserve.layers.quantization import WEIGHT_ONLY_METHODS, LinearMethod, weight_only_method
from kvserve.layers.quantization.cpu import CpuLinearMethod
from kvserve.layers.quantization.gguf import GgufLinearMethod
from kvserve.models.llama_decode import FusedLlamaDecode
from kvserve.platforms.base import Platform
from kvserve.platforms.host_malloc import keep_freed_memory


class CpuPlatform(Platform):
    """Host tuning for a few cores; float32 models get CpuLinearMethod and the compiled RMSNorm."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        is_float32 = config.load.torch_dtype == torch.float32
        # Batch-1 matmuls and RMSNorm on the compiled kernels: float32, option on, a C compiler found.
        self.use_native_kernels = is_float32 and config.platform.cpu_native_kernels and native_ops.available()
        # Without the GEMV, small float32 steps run on OpenBLAS (the GEMV is faster and needs no step context).
        self.blas_step = HostBlasStep(config.platform.cpu_blas_max_tokens if is_float32 and not self.use_native_kernels
                                      else 0)
        self._previous_threads: int | None = None
        self._blas_limits: threadpool_limits | None = None

    def configure(self) -> None:
        """Torch threads (num_threads), OpenBLAS threads to match, glibc keeping freed memory."""
        self._previous_threads = torch.get_num_threads()
        if self.config.platform.num_threads:
            torch.set_num_threads(self.config.platform.num_threads)
        keep_freed_memory()
        self._blas_limits = threadpool_limits(limits=torch.get_num_threads(), user_api="blas")

    def restore(self) -> None:
        """Torch's and OpenBLAS's previous thread counts (the malloc settings stay)."""
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
            self._blas_limits = None
        if self._previous_threads is not None:
            torch.set_num_threads(self._previous_threads)
            self._previous_threads = None

    def computes_on_gguf(self, dtype: torch.dtype) -> bool:
        """float32 with the compiled kernels on (cpu_native_kernels) and built."""
        return self.use_native_kernels and gguf_ops.available()

    def linear_method(self, dtype: torch.dtype, quantization: str | None = None) -> LinearMethod:
        """gguf: GgufLinearMethod; float32: CpuLinearMethod with the fast paths the options allow, or int8 / int4 /
        awq on the compiled integer kernels (with CpuLinearMethod for the embedding and LM head); else the base
        platform's methods."""
        if quantization == "gguf" and self.computes_on_gguf(dtype):
            return GgufLinearMethod(self.config.platform.cpu_gguf_int8_activations)
        if dtype != torch.float32 or quantization not in (None, *WEIGHT_ONLY_METHODS):
            return super().linear_method(dtype, quantization)
        dense = CpuLinearMethod(self.use_native_kernels, self.config.platform.cpu_packed_weights and onednn.available(),
                                self.blas_step)
        if quantization is None:
            return dense
        return weight_only_method(quantization, dense, self.weight_only_kernels(dtype),
                                  self.config.load.quantization_group_size)

    def weight_only_kernels(self, dtype: torch.dtype) -> ModuleType | None:
        """The compiled integer kernels (layers/int_ops.py) for float32 where they run (cpu_native_kernels)."""
        return int_ops if dtype == torch.float32 and self.use_native_kernels and int_ops.available() else None

    def fused_decode(self, model: nn.Module, attention_backend: object, kv_caches: list) -> FusedLlamaDecode | None:
        """The compiled Llama decode step (cpu_fused_decode) where the model, its weights and the caches allow."""
        decode_kernel = getattr(attention_backend, "use_kernel", False)  # the cpu backend's paged decode
        sharded = tp_group().world_size > 1  # its C layers have no all-reduce between them
        if not (self.config.platform.cpu_fused_decode and self.use_native_kernels and not sharded
                and FusedLlamaDecode.supports(model, kv_caches, decode_kernel)):
            return None
        # the attention backend's Q.K (cpu_native.py): the module path's decodes and these must round alike
        return FusedLlamaDecode(model, kv_caches, getattr(attention_backend, "int8_queries", False))

    def norm_kernel(self, dtype: torch.dtype) -> NormKernel:
        """The compiled RMSNorm (one pass instead of ~6 torch ops) where the native kernels run."""
        if dtype == torch.float32 and self.use_native_kernels:
            return native_ops.rms_norm
        return super().norm_kernel(dtype)

    def step_context(self, num_tokens: int) -> AbstractContextManager[None]:
        """A host-BLAS step (torch on one thread) for steps of up to cpu_blas_max_tokens without the GEMV."""
        return self.blas_step.run() if num_tokens <= self.blas_step.max_tokens else nullcontext()
