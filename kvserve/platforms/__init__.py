"""Platforms: everything device- or host-specific, asked once by the engine (`get_platform`).

A platform chooses the linear method and the norm kernel for the model's dtype, gives the runner a context for
each step, and sizes the KV cache when `kv_cache_memory` is unset. The process-wide changes all live here,
made by `configure()` at engine start and undone by `restore()` (`Engine.shutdown()`) where they can be:
- CPU: torch.set_num_threads(num_threads), when set: restored.
- CPU: OpenBLAS (numpy's BLAS) limited to torch's thread count (threadpoolctl): restored.
- CPU: glibc keeps freed memory (mallopt, platforms/host_malloc.py): NOT reversible (glibc cannot report the
  previous settings), it stays for the life of the process.
- CPU float32 without the compiled GEMV: each step of up to `cpu_blas_max_tokens` tokens runs torch on one
  thread (layers/host_blas.py); restored at the end of the step.
- CUDA: none (the memory profiling step empties torch's cache and resets its peak statistics).
"""

from __future__ import annotations

from kvserve.config import EngineConfig
from kvserve.platforms.base import Platform
from kvserve.platforms.cpu import CpuPlatform
from kvserve.platforms.cuda import CudaPlatform

__all__ = ["CpuPlatform", "CudaPlatform", "Platform", "get_platform"]


def get_platform(config: EngineConfig) -> Platform:
    """The platform for `config.load.device`: CPU, CUDA, or the plain torch one for other devices."""
    kind = config.load.device.split(":")[0]
    platform_class = {"cpu": CpuPlatform, "cuda": CudaPlatform}.get(kind, Platform)
    return platform_class(config)
