"""What every decoder-only model here shares: embed, run the layers over the paged cache, project to logits."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.attention.backend import AttentionMetadata
from kvserve.kv.kv_cache import LayerKVCache


class DecoderForCausalLM(nn.Module):
    """Base of the causal LMs: subclasses build `self.config`, `self.model` (rotary, layers, norm,
    embed_tokens unless tied) and `self.lm_head`."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKVCache], metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden_size]."""
        hidden = self.embed(input_ids)
        cos_sin = self.model.rotary.lookup(positions, hidden.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(cos_sin, hidden, kv_cache, metadata)
        return self.model.norm(hidden)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden_size]."""
        if self.config.tie_word_embeddings:  # read from the LM head's [hidden, vocab] weight
            return self.lm_head.weight_t.index_select(1, input_ids).t()
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> [N, vocab_size] in float32."""
        return self.lm_head(hidden).float()
