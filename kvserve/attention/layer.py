"""The attention layer a model builds: its head counts and scale, and the engine's backend (chosen once)."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend, AttentionMetadata
from kvserve.kv.kv_cache import LayerKVCache


class Attention(nn.Module):
    """Paged attention of one layer: writes the step's K/V into its cache and attends over it."""

    def __init__(self, backend: AttentionBackend, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float) -> None:
        super().__init__()
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: LayerKVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] -> [T, Hq, D]; `metadata` is the backend's for this step."""
        return self.backend.forward(query, key, value, kv_cache, metadata, self.scale)
