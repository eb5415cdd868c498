"""Random paged-attention steps for comparing a backend against torch_ref (shared by the backend tests)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvserve.attention.backend import AttentionBackend, AttentionRequirements, CommonAttentionMetadata
from kvserve.attention.selector import create_attention_backend
from kvserve.attention.torch_metadata import TorchAttentionMetadata, build_torch_metadata
from kvserve.attention.torch_ref import write_kv
from kvserve.kv.int4_residual import Int4ResidualLayout
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


# Steps of (request, new tokens), decodes first: a long prompt (several spans and split-KV partitions), prompts ending
# inside a block, a chunk after a cached prefix whose first block was incomplete, a prompt ending on a block's end.
INT4_STEPS = [
    [("a", 700), ("b", 45), ("c", 37)],
    [("a", 1), ("b", 1), ("c", 20), ("d", 32)],
    [("a", 1), ("b", 1), ("c", 1), ("d", 1)],
]
INT4_FIELDS = ("key", "value", "key_scale", "value_scale", "key_zero", "value_zero", "residual_key", "residual_value")


def run_int4_steps(backends: dict[str, AttentionBackend], device: str,
                   edit: Callable[[str, object], None] = lambda name, metadata: None) -> list[dict[str, torch.Tensor]]:
    """INT4_STEPS through each backend on a KIVI int4 cache of its own (GQA 6 / 2 heads of 64, blocks of 16, shuffled
    physical blocks), the same random inputs for all: each step's outputs [T, Hq, D] by backend. Every backend
    writes with torch_ref.write_kv_int4, so the caches must stay bit-equal (asserted). `edit(name, metadata)` may
    change a backend's step metadata before its forward."""
    block_size, num_kv_heads, group, head_dim, num_blocks = 16, 2, 3, 64, 80
    spec = KVCacheSpec(num_kv_heads, head_dim, head_dim, "int4", group_size=block_size)
    gen = torch.Generator().manual_seed(0)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    caches = {name: allocate_kv_caches([spec], num_blocks, block_size, device, num_residual_slots=4)[0]
              for name in backends}
    layout = Int4ResidualLayout(4, block_size)
    tables: dict[str, list[int]] = {}
    computed: dict[str, int] = {}
    outputs = []
    for step in INT4_STEPS:
        for request, count in step:
            table = tables.setdefault(request, [])
            computed.setdefault(request, 0)
            while len(table) * block_size < computed[request] + count:
                table.append(free.pop())
        requests = [request for request, _ in step]
        common = build_common_metadata(requests, [computed[r] for r in requests], [n for _, n in step],
                                       [tables[r] for r in requests], block_size, torch.device(device), int4=layout)
        query = torch.randn(common.num_tokens, num_kv_heads * group, head_dim, generator=gen).to(device)
        kv = torch.randn(common.num_tokens, 2 * num_kv_heads, head_dim, generator=gen).to(device)
        out = {}
        for name, backend in backends.items():
            metadata = backend.build_metadata(common)
            edit(name, metadata)
            out[name] = backend.forward(query, kv[:, :num_kv_heads], kv[:, num_kv_heads:], caches[name], metadata,
                                        head_dim ** -0.5)
        outputs.append(out)
        first = next(iter(caches.values()))
        for cache in caches.values():
            for field in INT4_FIELDS:
                assert torch.equal(getattr(cache, field), getattr(first, field)), field
        for request, count in step:
            computed[request] += count
    return outputs


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
