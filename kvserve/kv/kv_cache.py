"""Device tensors of the paged KV cache, allocated once from a memory budget."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, fields

import torch

from kvserve.kv.dtypes import torch_dtype
from kvserve.kv.kv_quant import INT4_PARAM_DTYPE
from kvserve.kv.kv_spec import KVCacheSpec


@dataclass
class LayerKVCache:
    """One layer's paged cache: key/value [num_blocks, block_size, Hkv, D] (codes if quantized), plus parameters.

    int8 / fp8: key_scale / value_scale [num_blocks, block_size, Hkv, 1] float32.
    int4: codes packed two per byte [..., D / 2]; key_scale / key_zero [num_blocks, 1, Hkv, D] (per channel, per
    block), value_scale / value_zero [num_blocks, block_size, Hkv, 1] (per token), float16; and the residual
    [num_residual_slots, block_size, Hkv, D] in the model dtype: each running request's newest, incomplete block,
    kept exact until it fills and can be quantized per channel.
    """

    key: torch.Tensor
    value: torch.Tensor
    kv_cache_dtype: str = "auto"
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    key_zero: torch.Tensor | None = None
    value_zero: torch.Tensor | None = None
    residual_key: torch.Tensor | None = None
    residual_value: torch.Tensor | None = None

    @property
    def is_quantized(self) -> bool:
        """Whether the cache holds codes plus scales."""
        return self.key_scale is not None

    @property
    def is_int4(self) -> bool:
        """Whether this is the KIVI int4 layout (per-channel key groups and a full-precision residual)."""
        return self.kv_cache_dtype == "int4"

    @property
    def num_bytes(self) -> int:
        """Bytes held by this layer's tensors, residual included."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def zeros(*size: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor; on the CPU over an anonymous memory mapping, whose pages the OS zero-fills only when first
    written, so that the process's resident memory grows with the blocks in use, not with the whole budget."""
    count = math.prod(size)
    if torch.device(device).type != "cpu" or count == 0:
        return torch.zeros(*size, dtype=dtype, device=device)
    mapping = mmap.mmap(-1, count * torch.empty(0, dtype=dtype).element_size())
    return torch.frombuffer(mapping, dtype=dtype, count=count).view(*size)  # the tensor keeps the mapping alive


def allocate_kv_caches(specs: list[KVCacheSpec], num_blocks: int, block_size: int, device: torch.device | str,
                       model_dtype: torch.dtype = torch.float32, num_residual_slots: int = 0) -> list[LayerKVCache]:
    """One LayerKVCache per layer, zero-filled (masked-out slots must hold finite values)."""
    caches = []
    for spec in specs:
        shape = (num_blocks, block_size, spec.num_kv_heads)
        if spec.dtype == "int4":
            caches.append(_int4_cache(spec, shape, device, model_dtype, num_residual_slots))
        elif spec.is_quantized:
            storage, scale = torch_dtype(spec.kv_dtype.storage_dtype), torch_dtype(spec.kv_dtype.param_dtype)
            caches.append(LayerKVCache(
                zeros(*shape, spec.key_dim, dtype=storage, device=device),
                zeros(*shape, spec.value_dim, dtype=storage, device=device),
                spec.dtype,
                zeros(*shape, 1, dtype=scale, device=device),
                # MLA caches no separate value (value_dim 0): no value scales either.
                zeros(*shape, 1 if spec.value_dim else 0, dtype=scale, device=device),
            ))
        else:
            dtype = torch_dtype(spec.kv_dtype.storage_dtype)
            caches.append(LayerKVCache(zeros(*shape, spec.key_dim, dtype=dtype, device=device),
                                       zeros(*shape, spec.value_dim, dtype=dtype, device=device)))
    return caches


def _int4_cache(spec: KVCacheSpec, shape: tuple[int, int, int], device: torch.device | str,
                model_dtype: torch.dtype, num_residual_slots: int) -> LayerKVCache:
    num_blocks, block_size, heads = shape

    def zeros_here(*size: int, dtype: torch.dtype = INT4_PARAM_DTYPE) -> torch.Tensor:
        return zeros(*size, dtype=dtype, device=device)

    residual = (num_residual_slots, block_size, heads)
    return LayerKVCache(
        key=zeros_here(*shape, spec.key_dim // 2, dtype=torch.uint8),
        value=zeros_here(*shape, spec.value_dim // 2, dtype=torch.uint8),
        kv_cache_dtype="int4",
        key_scale=zeros_here(num_blocks, 1, heads, spec.key_dim),
        value_scale=zeros_here(*shape, 1),
        key_zero=zeros_here(num_blocks, 1, heads, spec.key_dim),
        value_zero=zeros_here(*shape, 1),
        residual_key=zeros_here(*residual, spec.key_dim, dtype=model_dtype),
        residual_value=zeros_here(*residual, spec.value_dim, dtype=model_dtype),
    )


def residual_bytes_per_slot(specs: list[KVCacheSpec], block_size: int, model_dtype: torch.dtype) -> int:
    """Bytes of one int4 residual slot (one block of full-precision K/V per layer); 0 for other caches."""
    element = torch.empty(0, dtype=model_dtype).element_size()
    return sum(block_size * spec.elements_per_token * element for spec in specs if spec.dtype == "int4")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device: CUDA's free bytes, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return host_memory_bytes("MemAvailable")


def host_memory_bytes(entry: str = "MemTotal") -> int:
    """A /proc/meminfo entry in bytes (MemTotal: the host's memory; MemAvailable: what it can still give)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(f"{entry}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"cannot read {entry} from /proc/meminfo")
