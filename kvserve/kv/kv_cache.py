"""Device tensors of the paged KV cache, allocated once from a memory budget."""

from __future__ import annotations

import torch

from kvserve.kv.kv_spec import KVCacheSpec

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int8": torch.int8, "uint8": torch.uint8}


def allocate_kv_caches(specs: list[KVCacheSpec], num_blocks: int, block_size: int,
                       device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer a (key, value) pair of [num_blocks, block_size, num_kv_heads, dim] tensors."""
    caches = []
    for spec in specs:
        dtype = _TORCH_DTYPES[spec.dtype]
        shape = (num_blocks, block_size, spec.num_kv_heads)
        key = torch.zeros(*shape, spec.key_dim, dtype=dtype, device=device)
        value = torch.zeros(*shape, spec.value_dim, dtype=dtype, device=device)
        caches.append((key, value))
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
