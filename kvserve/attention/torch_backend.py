"""The pure-torch backend (torch_ref's kernels behind the AttentionBackend seam): runs anywhere, serves every
KV dtype, the sinks + window layout and MLA, and is the oracle the faster backends are tested against."""

from __future__ import annotations

import torch

from kvserve.attention import mla, torch_ref
from kvserve.attention.backend import AttentionBackend, AttentionRequirements, CommonAttentionMetadata, MLABackend
from kvserve.attention.torch_metadata import TorchAttentionMetadata, build_torch_metadata
from kvserve.kv.dtypes import STORAGE_DTYPES
from kvserve.kv.kv_cache import LayerKVCache


class TorchAttentionBackend(AttentionBackend, MLABackend):
    """torch_ref: batched SDPA decodes over gathered blocks, one SDPA call per prefill."""

    name = "torch"
    devices = ()
    kv_cache_dtypes = frozenset(STORAGE_DTYPES)
    supports_window = True
    supports_mla = True
    supports_sliding_window = True
    supports_logits_soft_cap = True

    def __init__(self, needs: AttentionRequirements) -> None:
        self.check_supported(needs)
        self.logits_soft_cap = needs.logits_soft_cap

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        """Prefill sequences and the dense decode mask."""
        return build_torch_metadata(common)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                metadata: TorchAttentionMetadata, scale: float) -> torch.Tensor:
        """Write K/V, then attend: query [T, Hq, D] -> [T, Hq, D]."""
        return torch_ref.paged_attention(query, key, value, cache, metadata, scale, soft_cap=self.logits_soft_cap)

    def write_latent(self, latent: torch.Tensor, cache: LayerKVCache, metadata: TorchAttentionMetadata) -> None:
        """Store this step's latents [T, d_c + d_rope] at their slots."""
        mla.write_latent(latent, cache, metadata.slot_mapping)

    def prefill_latents(self, latent: torch.Tensor, cache: LayerKVCache,
                        metadata: TorchAttentionMetadata) -> list[tuple[slice, torch.Tensor]]:
        """Per prefill: (its rows, its latents [S, D], the cached prefix read back and this step's rows as computed)."""
        result = []
        for seq in metadata.prefills:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            result.append((rows, mla.prefill_latents(latent[rows], cache, seq)))
        return result

    def absorbed_decode(self, query: torch.Tensor, cache: LayerKVCache, metadata: TorchAttentionMetadata,
                        kv_lora_rank: int, scale: float) -> torch.Tensor:
        """Latent-space queries [B, H, d_c + d_rope] -> attention-weighted latents [B, H, d_c]."""
        return mla.absorbed_decode(query, cache, metadata, kv_lora_rank, scale)
