"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with QKV bias, Qwen3 with QK-norm).

MHA, GQA and MQA are one code path: the attention variant follows from `num_kv_heads`.
Module names follow Hugging Face's so checkpoints map one to one, except that Q/K/V and
gate/up are fused into one projection each (fewer, larger matmuls per step).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvserve.attention.backend import AttentionMetadata
from kvserve.attention.torch_ref import paged_attention
from kvserve.config import ModelConfig
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.activation import silu_and_mul
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]  # key, value: [num_blocks, block_size, Hkv, D] each


class LlamaAttention(nn.Module):
    """Self-attention with fused QKV, RoPE and the paged KV cache."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.use_qk_norm = config.use_qk_norm
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size]."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], metadata, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.head_dim, max_position, config.rope_theta,
                                 config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The causal LM: `forward` gives hidden states, `compute_logits` the vocabulary scores."""

    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def kv_cache_specs(self, dtype: str) -> list[KVCacheSpec]:
        """One cache spec per layer: Hkv heads of head_dim keys and values."""
        spec = KVCacheSpec(self.config.num_kv_heads, self.config.head_dim, self.config.head_dim,
                           dtype)
        return [spec] * self.config.num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden_size]."""
        hidden = self.model.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, kv_cache, metadata)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> [N, vocab_size] in float32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, filling the fused projections slice by slice."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            target, rows = self._fused_target(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            part = param.data if rows is None else param.data[rows]
            if part.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(part.shape)}")
            part.copy_(tensor)
            loaded.add(name)
        self._check_complete(loaded)

    def _fused_target(self, name: str) -> tuple[str, slice | None]:
        """Map an HF name to (our parameter, its rows) for the fused QKV and gate/up projections."""
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        inter = cfg.intermediate_size
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", slice(0, q)),
            "self_attn.k_proj": ("self_attn.qkv_proj", slice(q, q + kv)),
            "self_attn.v_proj": ("self_attn.qkv_proj", slice(q + kv, q + 2 * kv)),
            "mlp.gate_proj": ("mlp.gate_up_proj", slice(0, inter)),
            "mlp.up_proj": ("mlp.gate_up_proj", slice(inter, 2 * inter)),
        }
        for hf_part, (ours, rows) in fused.items():
            if f".{hf_part}." in name:
                return name.replace(hf_part, ours), rows
        return name, None

    def _check_complete(self, loaded: set[str]) -> None:
        cfg = self.config
        expected = 2 + 9 * cfg.num_layers + (0 if cfg.tie_word_embeddings else 1)
        expected += cfg.num_layers * (3 * cfg.attention_bias + cfg.o_proj_bias)
        expected += 2 * cfg.num_layers * cfg.use_qk_norm
        if len(loaded) != expected:
            raise ValueError(f"checkpoint has {len(loaded)} of the {expected} tensors "
                             f"{cfg.architecture} needs")
