"""Random paged-attention steps for comparing a backend against torch_ref (shared by the backend tests)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from kvserve.attention.backend import AttentionBackend, AttentionRequirements, CommonAttentionMetadata
from kvserve.attention.selector import create_attention_backend
from kvserve.attention.torch_metadata import TorchAttentionMetadata, build_torch_metadata
from kvserve.attention.torch_ref import write_kv
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.runner.attention_inputs import build_common_metadata

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class Step:
    """One step's inputs: packed q [T, Hq, D], new k/v [T, Hkv, D], a cache holding the history, the common
    metadata and torch_ref's metadata derived from it."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: LayerKVCache
    common: CommonAttentionMetadata
    metadata: TorchAttentionMetadata
    scale: float
    kv_cache_dtype: str  # the cache's storage dtype (a KVCacheSpec dtype)


def make_step(requests: list[tuple[int, int]], *, num_kv_heads: int, group: int, head_dim: int, block_size: int,
              kv_cache_dtype: str = "auto", dtype: torch.dtype = torch.float32, device: str = "cpu",
              seed: int = 0) -> Step:
    """requests: (seq_len, query_len) each; query_len 1 first (decodes), as the runner packs them.

    Physical blocks are shuffled so that a kernel reading the wrong block cannot pass, and the
    cached prefix of each request (seq_len - query_len tokens) is already in the cache.
    """
    gen = torch.Generator().manual_seed(seed)
    num_decodes = sum(1 for _, query_len in requests if query_len == 1)
    if any(query_len == 1 for _, query_len in requests[num_decodes:]):
        raise ValueError("decodes (query_len 1) come first")
    blocks_needed = [-(-seq_len // block_size) for seq_len, _ in requests]
    num_blocks = sum(blocks_needed) + 3  # a few blocks no request owns
    storage = _DTYPE_NAMES[dtype] if kv_cache_dtype == "auto" else kv_cache_dtype
    spec = KVCacheSpec(num_kv_heads, head_dim, head_dim, storage)
    cache = allocate_kv_caches([spec], num_blocks, block_size, device)[0]
    physical = torch.randperm(num_blocks, generator=gen)
    tables, used = [], 0
    for count in blocks_needed:
        tables.append(physical[used:used + count].to(device))
        used += count

    def randn(*shape: int) -> torch.Tensor:
        # Per-token magnitudes vary, so quantization scales differ from token to token.
        x = torch.randn(*shape, generator=gen) * (0.5 + 2 * torch.rand(shape[0], *([1] * (len(shape) - 1)),
                                                                     generator=gen))
        return x.to(device=device, dtype=dtype)

    def slots(table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop, device=device)
        return table[pos // block_size] * block_size + pos % block_size

    history = torch.cat([slots(t, 0, s - q) for t, (s, q) in zip(tables, requests, strict=True)])
    write_kv(randn(len(history), num_kv_heads, head_dim), randn(len(history), num_kv_heads, head_dim), cache,
             history)
    slot_mapping = torch.cat([slots(t, s - q, s) for t, (s, q) in zip(tables, requests, strict=True)])
    num_tokens = len(slot_mapping)
    # K and V as views into one fused tensor, with a token stride > Hkv * D like the model's QKV split.
    kv = randn(num_tokens, 3 * num_kv_heads, head_dim)
    key, value = kv[:, :num_kv_heads], kv[:, 2 * num_kv_heads:]
    query = randn(num_tokens, num_kv_heads * group, head_dim)

    common = build_common_metadata([f"request-{i}" for i in range(len(requests))], [s - q for s, q in requests],
                                   [q for _, q in requests], [t.tolist() for t in tables], block_size,
                                   torch.device(device))
    assert torch.equal(common.slot_mapping, slot_mapping)  # the runner's builder agrees with the tensor math
    return Step(query, key, value, cache, common, build_torch_metadata(common), head_dim ** -0.5, storage)


def backend_for(name: str, step: Step) -> AttentionBackend:
    """The backend `name` as the engine would create it for this step's cache."""
    needs = AttentionRequirements(torch.device(step.query.device.type), step.kv_cache_dtype, use_window=False,
                                  use_mla=False)
    return create_attention_backend(name, needs)


def run_backend(backend: AttentionBackend, step: Step, cache: LayerKVCache | None = None) -> torch.Tensor:
    """One layer's forward on `backend` (its metadata built from the step's common metadata) -> [T, Hq, D]."""
    return backend.forward(step.query, step.key, step.value, step.cache if cache is None else cache,
                           backend.build_metadata(step.common), step.scale)


def clone_cache(cache: LayerKVCache) -> LayerKVCache:
    """An independent copy, so that two backends can each write their own."""
    return copy.deepcopy(cache)


def assert_same_cache(actual: LayerKVCache, expected: LayerKVCache) -> None:
    """Bit-exact equality of codes / values and scales."""
    assert torch.equal(actual.key, expected.key)
    assert torch.equal(actual.value, expected.value)
    if expected.key_scale is not None:
        assert torch.equal(actual.key_scale, expected.key_scale)
        assert torch.equal(actual.value_scale, expected.value_scale)
