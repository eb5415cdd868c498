"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with QKV bias, Qwen3 with QK-norm, Phi-3).

MHA, GQA and MQA are one code path: the attention variant follows from `num_kv_heads`.
Module names follow Hugging Face's so checkpoints map one to one, except that Q/K/V and
gate/up are fused into one projection each (fewer, larger matmuls per step).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend, AttentionMetadata
from kvserve.attention.layer import Attention
from kvserve.config import ModelConfig
from kvserve.distributed.sharding import local_heads
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.embedding import LMHead, VocabEmbedding
from kvserve.layers.linear import column_parallel, row_parallel
from kvserve.layers.mlp import GatedMLP
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding, apply_rotary
from kvserve.models.base import DecoderForCausalLM

CosSin = tuple[torch.Tensor, torch.Tensor]  # [T, 1, D] each


class LlamaAttention(nn.Module):
    """Self-attention with fused QKV, RoPE and the paged KV cache."""

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend) -> None:
        super().__init__()
        heads = local_heads(config.num_heads, config.num_kv_heads)  # this rank's (all, without tensor parallelism)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.head_dim = head_dim = config.head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        kv_rows = (heads.kv_start * head_dim, self.kv_size)
        self.qkv_proj = column_parallel(config.hidden_size, [(heads.q_start * head_dim, self.q_size), kv_rows, kv_rows],
                                        bias=config.attention_bias)
        self.o_proj = row_parallel((heads.q_start * head_dim, self.q_size), config.hidden_size, bias=config.o_proj_bias)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.use_qk_norm = config.use_qk_norm
        self.rotary_kernel = apply_rotary  # the platform may swap in a fused one (rotating in place)
        self.attn = Attention(attention_backend, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5)

    def forward(self, cos_sin: CosSin, hidden: torch.Tensor, kv_cache: LayerKVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size]."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 * Hkv) * D]
        # Q and K sit side by side in the fused output: rotate all their heads in one go.
        qk = qkv[:, :self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        q, k = self.rotary_kernel(qk, cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.attn(q, k, v, kv_cache, metadata)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, attention_backend)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)  # SwiGLU
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, cos_sin: CosSin, hidden: torch.Tensor, kv_cache: LayerKVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        attended = self.self_attn(cos_sin, self.input_layernorm(hidden), kv_cache, metadata)
        normed, hidden = self.post_attention_layernorm.add_and_norm(hidden, attended)
        return hidden + self.mlp(normed)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, max_position, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attention_backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(DecoderForCausalLM):
    """The causal LM: `forward` gives hidden states, `compute_logits` the vocabulary scores."""

    supports_kv_window = True  # attention sinks + sliding window (torch_ref's window path)
    uses_mla = False
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, attention_backend)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.tie_weights()

    @classmethod
    def uses_sliding_window(cls, config: ModelConfig) -> bool:
        """Whether every layer attends within config.sliding_window (Mistral, Phi-3 with one set)."""
        return config.architecture in _WINDOWED_ARCHITECTURES and bool(config.extra.get("sliding_window"))

    def kv_cache_specs(self, dtype: str) -> list[KVCacheSpec]:
        """One cache spec per layer: Hkv heads of head_dim keys and values, in a sliding window where the
        architecture applies its config's `sliding_window` to every layer (Mistral, Phi-3)."""
        window = self.config.extra.get("sliding_window") if self.uses_sliding_window(self.config) else None
        num_kv_heads = local_heads(self.config.num_heads, self.config.num_kv_heads).num_kv_heads  # this rank's
        spec = KVCacheSpec(num_kv_heads, self.config.head_dim, self.config.head_dim, dtype,
                           sliding_window=window)
        return [spec] * self.config.num_layers


# Architectures whose every layer attends within config.sliding_window when it is set (transformers passes it to
# each attention call); Qwen2's sliding_window only counts with use_sliding_window, which kvserve does not run.
_WINDOWED_ARCHITECTURES = frozenset({"MistralForCausalLM", "Phi3ForCausalLM"})


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3: a Llama whose checkpoint stores Q/K/V and gate/up already fused (split here, so that every linear
    method loads them as it loads Llama's shards)."""

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> None:
        factor = config.extra.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ValueError(f"Phi3ForCausalLM with partial_rotary_factor={factor} is not supported (only 1.0)")
        super().__init__(config, max_position, attention_backend)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """`...qkv_proj.weight` -> q/k/v_proj, `...gate_up_proj.weight` -> gate/up_proj (rows in that order)."""
        config = self.config
        if ".self_attn.qkv_proj." in name:
            q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            parts = zip(("q_proj", "k_proj", "v_proj"), tensor.split([q_size, kv_size, kv_size]), strict=True)
            return [(name.replace(".qkv_proj.", f".{part}."), piece) for part, piece in parts]
        if ".mlp.gate_up_proj." in name:
            gate, up = tensor.chunk(2, dim=0)
            return [(name.replace(".gate_up_proj.", f".{part}."), piece)
                    for part, piece in (("gate_proj", gate), ("up_proj", up))]
        return super().checkpoint_tensors(name, tensor)
