"""The CPU KV cache commits memory as blocks are written, not for the whole budget at start-up."""

from __future__ import annotations

import os

import torch

from kvserve.kv.kv_cache import allocate_kv_caches
from kvserve.kv.kv_spec import KVCacheSpec

MIB = 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_cache_memory_follows_the_blocks_written() -> None:
    spec = KVCacheSpec(3, 64, 64, "float32")
    before = _resident_bytes()
    caches = allocate_kv_caches([spec] * 4, num_blocks=4096, block_size=16, device="cpu")  # 4 x 2 x 48 MiB
    assert sum(cache.num_bytes for cache in caches) >= 384 * MIB
    assert _resident_bytes() - before < 32 * MIB  # nothing touched yet
    assert torch.equal(caches[0].key[:8], torch.zeros_like(caches[0].key[:8]))  # reads as zeros
    for cache in caches:
        cache.key[:256] = 1.0  # 256 of 4096 blocks written in every layer: ~12 MiB
    grown = _resident_bytes() - before
    assert 8 * MIB < grown < 48 * MIB
    assert float(caches[3].key[255].sum()) == 16 * 3 * 64
