"""What every decoder-only model here shares: embed, run the layers over the paged cache, project to logits,
and load a checkpoint through the one weight path (loader/model_loader.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from kvserve.attention.backend import AttentionMetadata
from kvserve.config import ModelConfig
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.loader.model_loader import load_model_weights

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


class DecoderForCausalLM(nn.Module):
    """Base of the causal LMs: subclasses build `self.config`, `self.model` (embed_tokens, rotary, layers, norm)
    and `self.lm_head`, call `tie_weights()`, and declare their fused modules in `packed_modules_mapping`."""

    packed_modules_mapping: dict[str, list[str]] = {}
    # Set by the platform once the KV cache exists: runs whole decode steps in one compiled call where it can
    # (models/llama_decode.py); None: every step runs the modules.
    fused_decode = None

    @classmethod
    def uses_sliding_window(cls, config: ModelConfig) -> bool:
        """Whether some layer's KV cache spec has a sliding window (known before the model is built)."""
        return False

    @classmethod
    def logits_soft_cap(cls, config: ModelConfig) -> float | None:
        """The attention score soft-cap the backend must apply (Gemma 2), or None."""
        return None

    def tie_weights(self) -> None:
        """With tie_word_embeddings the LM head's weight [vocab, hidden] is the embedding's (one parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKVCache], metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden_size]."""
        if self.fused_decode is not None:
            hidden = self.fused_decode.forward(self, input_ids, positions, metadata)
            if hidden is not None:
                return hidden
        hidden = self.model.embed_tokens(input_ids)
        cos_sin = self.model.rotary.lookup(positions, hidden.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(cos_sin, hidden, kv_cache, metadata)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> [N, vocab_size] in float32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors (see loader/model_loader.py)."""
        load_model_weights(self, weights)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """The (our name, tensor) pairs a checkpoint tensor fills: rotary buffers and the layers past num_layers
        (DeepSeek-V3's multi-token-prediction module; a truncated draft model) are skipped, and a tied model's
        LM head, if stored, is the embedding already."""
        if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return ()
        match = _LAYER_INDEX.match(name)
        if match is not None and int(match.group(1)) >= self.config.num_layers:
            return ()
        return ((name, tensor),)
