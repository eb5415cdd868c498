"""Device tensors of the paged KV cache, allocated once from a memory budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.kv.kv_quant import QUANTIZED_DTYPES
from kvserve.kv.kv_spec import KVCacheSpec

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LayerKVCache:
    """One layer's paged cache: key/value [num_blocks, block_size, Hkv, D], plus [..., 1] scales if quantized."""

    key: torch.Tensor
    value: torch.Tensor
    kv_cache_dtype: str = "auto"
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    @property
    def is_quantized(self) -> bool:
        """Whether the cache holds codes plus scales."""
        return self.key_scale is not None

    @property
    def num_bytes(self) -> int:
        """Bytes held by this layer's tensors."""
        tensors = [self.key, self.value, self.key_scale, self.value_scale]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def allocate_kv_caches(specs: list[KVCacheSpec], num_blocks: int, block_size: int,
                       device: torch.device | str) -> list[LayerKVCache]:
    """One LayerKVCache per layer, zero-filled (masked-out slots must hold finite values)."""
    caches = []
    for spec in specs:
        shape = (num_blocks, block_size, spec.num_kv_heads)
        if not spec.is_quantized:
            dtype = _TORCH_DTYPES[spec.dtype]
            caches.append(LayerKVCache(torch.zeros(*shape, spec.key_dim, dtype=dtype, device=device),
                                       torch.zeros(*shape, spec.value_dim, dtype=dtype, device=device)))
            continue
        storage, _ = QUANTIZED_DTYPES[spec.dtype]
        caches.append(LayerKVCache(
            torch.zeros(*shape, spec.key_dim, dtype=storage, device=device),
            torch.zeros(*shape, spec.value_dim, dtype=storage, device=device),
            spec.dtype,
            torch.zeros(*shape, 1, dtype=torch.float32, device=device),
            torch.zeros(*shape, 1, dtype=torch.float32, device=device),
        ))
    return caches


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device: CUDA's free bytes, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")
