"""NVIDIA GPUs: the KV cache gets what gpu_memory_utilization leaves after a profiled worst-case step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.norm import AddNormKernel, NormKernel
from kvserve.platforms.base import Platform
from kvserve.platforms.cuda_memory import GIB, kv_budget, read_gpu_memory
from kvserve.runner.cuda_graphs import CapturedStep, StepFunction, cuda_graph_capture

if TYPE_CHECKING:
    from kvserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class CudaPlatform(Platform):
    """Plain torch layers, int8 / int4 / AWQ weights on Triton kernels (Triton attention is chosen by the
    attention seam); a profiled KV budget."""

    def weight_only_kernels(self, dtype: torch.dtype) -> ModuleType | None:
        """layers/triton_int.py (any activation dtype); without Triton, None: the dequantized weight."""
        try:
            from kvserve.layers import triton_int
        except ImportError:
            logger.warning("triton is not installed: weight-only layers multiply with their dequantized weights")
            return None
        return triton_int

    def norm_kernel(self, dtype: torch.dtype) -> NormKernel:
        """RMSNorm in one Triton kernel (layers/triton_fused.py), where Triton is installed."""
        fused = _triton_fused()
        return super().norm_kernel(dtype) if fused is None else fused.rms_norm

    def add_norm_kernel(self, dtype: torch.dtype) -> AddNormKernel | None:
        """The residual add and the RMSNorm after it in one Triton kernel."""
        fused = _triton_fused()
        return None if fused is None else fused.add_rms_norm

    def fused_kernels(self, dtype: torch.dtype) -> dict[Callable, Callable]:
        """SiLU-and-mul and RoPE (in place) in Triton."""
        fused = _triton_fused()
        return {} if fused is None else fused.REPLACEMENTS

    def decode_graph_capture(self) -> Callable[[StepFunction], CapturedStep] | None:
        """CUDA graphs sharing one memory pool, unless enforce_eager."""
        return None if self.config.platform.enforce_eager else cuda_graph_capture()

    def kv_cache_budget(self, runner: ModelRunner, specs: list[KVCacheSpec], max_model_len: int) -> int:
        """What gpu_memory_utilization leaves after the largest step and the decode graphs' memory pool (see
        platforms/cuda_memory.py)."""
        config, device = self.config, self.device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        block_size = config.cache.resolved_block_size
        scratch = runner.profile_step(specs, min(config.scheduler.max_num_batched_tokens, max_model_len),
                                      config.scheduler.max_num_seqs, block_size)
        memory = read_gpu_memory(device)
        torch.cuda.empty_cache()
        graph_bytes = self._decode_graph_bytes(runner, specs, block_size)
        budget = kv_budget(memory, config.cache.gpu_memory_utilization, scratch, graph_bytes)
        logger.info("profiling step: peak %.2f GiB without its scratch cache, %.2f GiB outside torch, decode graphs "
                    "%.2f GiB; KV cache budget %.2f GiB (gpu_memory_utilization=%s)",
                    (memory.peak_torch - scratch) / GIB, memory.outside_torch / GIB, graph_bytes / GIB, budget / GIB,
                    config.cache.gpu_memory_utilization)
        return budget

    def _decode_graph_bytes(self, runner: ModelRunner, specs: list[KVCacheSpec], block_size: int) -> int:
        """Device memory the decode graphs hold: every bucket captured over a scratch cache into a pool of its
        own, measured, then released (0 where no graphs will be captured)."""
        device = self.device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        try:
            graphs = runner.scratch_decode_graphs(specs, block_size)
        except Exception as error:  # noqa: BLE001 - the real capture will fail alike and run eagerly
            logger.warning("decode graph profiling failed (%s: %s): no memory set aside for graphs",
                           type(error).__name__, error)
            return 0
        if graphs is None:
            return 0
        torch.cuda.synchronize(device)
        used = torch.cuda.memory_reserved(device) - before
        del graphs  # the graphs and their pool
        torch.cuda.empty_cache()
        return used


def _triton_fused() -> ModuleType | None:
    """layers/triton_fused.py, or None without Triton (the torch kernels then serve)."""
    try:
        from kvserve.layers import triton_fused
    except ImportError:
        return None
    return triton_fused
