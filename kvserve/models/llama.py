"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with QKV bias, Qwen3 with QK-norm).

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
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.activation import silu_and_mul
from kvserve.layers.linear import Linear
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding, apply_rotary
from kvserve.models.base import DecoderForCausalLM

CosSin = tuple[torch.Tensor, torch.Tensor]  # [T, 1, D] each


class LlamaAttention(nn.Module):
    """Self-attention with fused QKV, RoPE and the paged KV cache."""

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.use_qk_norm = config.use_qk_norm
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
        q, k = apply_rotary(qk, cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.attn(q, k, v, kv_cache, metadata)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, attention_backend)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, cos_sin: CosSin, hidden: torch.Tensor, kv_cache: LayerKVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        hidden = hidden + self.self_attn(cos_sin, self.input_layernorm(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> None:
        super().__init__()
        # Tied models read their embeddings from the LM head's [hidden, vocab] weight instead.
        if not config.tie_word_embeddings:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, max_position, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attention_backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(DecoderForCausalLM):
    """The causal LM: `forward` gives hidden states, `compute_logits` the vocabulary scores."""

    supports_kv_window = True  # attention sinks + sliding window (torch_ref's window path)
    uses_mla = False

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, attention_backend)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def kv_cache_specs(self, dtype: str) -> list[KVCacheSpec]:
        """One cache spec per layer: Hkv heads of head_dim keys and values."""
        spec = KVCacheSpec(self.config.num_kv_heads, self.config.head_dim, self.config.head_dim,
                           dtype)
        return [spec] * self.config.num_layers

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, filling the fused projections slice by slice."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[tuple[str, str]] = set()
        for hf_name, tensor in weights:
            if "rotary_emb" in hf_name:
                continue
            name = hf_name
            if name == "model.embed_tokens.weight" and self.config.tie_word_embeddings:
                name = "lm_head.weight"
            module_path, _, kind = name.rpartition(".")
            module_path, rows = self._fused_target(module_path)
            module = modules.get(module_path)
            try:
                if isinstance(module, Linear):
                    loader = module.load_weight if kind == "weight" else module.load_bias
                    loader(tensor, rows)
                elif name in params and params[name].shape == tensor.shape:
                    params[name].data.copy_(tensor)
                else:
                    raise ValueError("no parameter of that name and shape")
            except ValueError as error:
                raise ValueError(f"checkpoint tensor {hf_name!r}: {error}") from None
            loaded.add((f"{module_path}.{kind}", str(rows)))
        self._check_complete(len(loaded))

    def _fused_target(self, module_path: str) -> tuple[str, slice | None]:
        """Map an HF module to (our module, its output rows) for the fused QKV and gate/up."""
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
            if module_path.endswith(hf_part):
                return module_path.replace(hf_part, ours), rows
        return module_path, None

    def _check_complete(self, num_loaded: int) -> None:
        cfg = self.config
        expected = 2 + 9 * cfg.num_layers + (0 if cfg.tie_word_embeddings else 1)
        expected += cfg.num_layers * (3 * cfg.attention_bias + cfg.o_proj_bias)
        expected += 2 * cfg.num_layers * cfg.use_qk_norm
        if num_loaded != expected:
            raise ValueError(f"checkpoint has {num_loaded} of the {expected} tensors "
                             f"{cfg.architecture} needs")
