"""Gemma 2 and Gemma 3 text decoders (Gemma 3: 270M, 1B and the text tower of the larger ones).

What differs from Llama, all read from the config:
- the embedding is scaled by sqrt(hidden_size); RMSNorm multiplies by (1 + weight), in float32;
- four norms per layer: before and after attention, before and after the MLP (the "sandwich");
- attention scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5; a GELU-tanh gated MLP;
- local (sliding-window) and global layers (`layer_types`): Gemma 2 alternates them, Gemma 3 has five local to
  one global, each kind with its own RoPE (local theta 10k unscaled, global theta 1M with the config's scaling);
- Gemma 2 soft-caps attention scores (attn_logit_softcapping) and logits (final_logit_softcapping); Gemma 3
  normalises Q and K per head instead.
The window is a property of the layer's KV cache spec: the hybrid KV cache (kv/kv_groups.py) keeps only the
window's blocks for local layers, and the attention metadata of their group masks keys outside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend, AttentionMetadata, GroupedAttentionMetadata
from kvserve.attention.layer import Attention
from kvserve.config import ModelConfig
from kvserve.distributed.sharding import local_heads
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.activation import gelu_tanh_and_mul
from kvserve.layers.embedding import LMHead, VocabEmbedding
from kvserve.layers.mlp import GatedMLP
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding
from kvserve.models.base import DecoderForCausalLM
from kvserve.models.llama import LlamaAttention

CosSin = tuple[torch.Tensor, torch.Tensor]  # [T, 1, D] each
SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types(extra: dict[str, Any], num_layers: int, default_pattern: int) -> list[str]:
    """Each layer's attention kind: the config's `layer_types`, else every `sliding_window_pattern`-th layer full
    (older configs: 6 in Gemma 3, 2 in Gemma 2)."""
    if extra.get("layer_types"):
        return list(extra["layer_types"])
    pattern = extra.get("sliding_window_pattern") or extra.get("_sliding_window_pattern") or default_pattern
    return [FULL if (index + 1) % pattern == 0 else SLIDING for index in range(num_layers)]


def rope_settings(extra: dict[str, Any]) -> dict[str, tuple[float, dict | None]]:
    """(theta, scaling) per attention kind: transformers 5's per-kind `rope_parameters`, else the older
    rope_theta / rope_scaling (global) and rope_local_base_freq (local, unscaled)."""
    parameters = extra.get("rope_parameters") or {}
    if FULL in parameters:
        settings = {}
        for kind in (FULL, SLIDING):
            values = parameters.get(kind) or {}
            scaling = {k: v for k, v in values.items() if k != "rope_theta"}
            settings[kind] = (values.get("rope_theta", 10000.0),
                              None if scaling.get("rope_type", "default") == "default" else scaling)
        return settings
    scaling = extra.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return {FULL: (extra.get("rope_theta", 1_000_000.0), scaling),
            SLIDING: (extra.get("rope_local_base_freq", 10000.0), None)}


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight): the checkpoint stores a plain norm's weight - 1. In float32 the platform's
    kernel runs it with that scale, derived once after loading; in other dtypes, as the reference, normalized and
    scaled in float32, then cast."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)
        self.register_buffer("scale", torch.ones(dim), persistent=False)

    def process_weights_after_loading(self) -> None:
        """scale [dim] = 1 + weight, in float32."""
        self.scale = 1.0 + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> same shape."""
        if x.dtype == torch.float32:
            return self.kernel(x, self.scale, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.scale).type_as(x)


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's (1 + w) Q/K norms (Gemma 3; Gemma 2 has none) and queries scaled by
    query_pre_attn_scalar ** -0.5 (a local layer's group masks outside its window; Gemma 2's score soft-cap is the
    backend's, set for the whole model)."""

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend, use_qk_norm: bool) -> None:
        super().__init__(config, attention_backend)
        self.use_qk_norm = use_qk_norm
        if use_qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        scalar = config.extra.get("query_pre_attn_scalar") or self.head_dim
        self.attn = Attention(attention_backend, self.num_heads, self.num_kv_heads, self.head_dim, scalar ** -0.5)


class GemmaDecoderLayer(nn.Module):
    """Sandwich-normed attention and MLP blocks with residual connections."""

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend, kind: str,
                 use_qk_norm: bool) -> None:
        super().__init__()
        self.kind = kind
        self.self_attn = GemmaAttention(config, attention_backend, use_qk_norm)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, gelu_tanh_and_mul)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, cos_sin: CosSin, hidden: torch.Tensor, kv_cache: LayerKVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        attended = self.self_attn(cos_sin, self.input_layernorm(hidden), kv_cache, metadata)
        hidden = hidden + self.post_attention_layernorm(attended)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class GemmaModel(nn.Module):
    """Scaled embedding, decoder layers with the RoPE table of each attention kind, final norm."""

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend,
                 gemma3: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # sqrt(hidden) rounded to the model dtype first, as the reference multiplies by it.
        self.register_buffer("normalizer", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        ropes = (rope_settings(config.extra) if gemma3
                 else dict.fromkeys((FULL, SLIDING), (config.rope_theta, config.rope_scaling)))
        self.rotary = nn.ModuleDict({kind: RotaryEmbedding(config.head_dim, max_position, theta, scaling)
                                     for kind, (theta, scaling) in ropes.items()})
        kinds = layer_types(config.extra, config.num_layers, 6 if gemma3 else 2)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, attention_backend, kind, use_qk_norm=gemma3)
                                    for kind in kinds)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(DecoderForCausalLM):
    """The causal LM; its local layers' KV cache slides (a hybrid cache), the global ones' holds everything."""

    supports_kv_window = False  # its own sliding window instead of sinks + window
    uses_mla = False
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    is_gemma3 = True

    @classmethod
    def logits_soft_cap(cls, config: ModelConfig) -> float | None:
        """Gemma 2's attention score cap (None in Gemma 3's configs)."""
        return config.extra.get("attn_logit_softcapping")

    @classmethod
    def uses_sliding_window(cls, config: ModelConfig) -> bool:
        """Whether some layer attends within a window."""
        return bool(config.extra.get("sliding_window"))

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, max_position, attention_backend, self.is_gemma3)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.final_logit_softcapping = config.extra.get("final_logit_softcapping")
        self.tie_weights()

    def kv_cache_specs(self, dtype: str) -> list[KVCacheSpec]:
        """One spec per layer; local layers carry their window."""
        window = self.config.extra.get("sliding_window")
        num_kv_heads = local_heads(self.config.num_heads, self.config.num_kv_heads).num_kv_heads  # this rank's
        return [KVCacheSpec(num_kv_heads, self.config.head_dim, self.config.head_dim, dtype,
                            sliding_window=window if layer.kind == SLIDING else None)
                for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKVCache], metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden_size]; `metadata` is one per KV group
        (GroupedAttentionMetadata) in a hybrid cache."""
        hidden = self.model.embed_tokens(input_ids)
        hidden = hidden * self.model.normalizer.to(hidden.dtype)
        rotations = {kind: rotary.lookup(positions, hidden.dtype) for kind, rotary in self.model.rotary.items()}
        for index, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            layer_metadata = metadata.for_layer(index) if isinstance(metadata, GroupedAttentionMetadata) else metadata
            hidden = layer(rotations[layer.kind], hidden, kv_cache, layer_metadata)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> [N, vocab_size] in float32, soft-capped where the config says."""
        logits = self.lm_head(hidden).float()
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2: alternating local and global layers on one RoPE, soft-capped scores and logits, no Q/K norms."""

    is_gemma3 = False
