"""DeepSeek-V2/V3 decoder: Multi-head Latent Attention (MLA) over a latent KV cache, and MoE feed-forward.

Module names follow Hugging Face's (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) so checkpoints map one
to one, except that gate/up projections are fused. Shapes in comments: T tokens, H heads, d_c = kv_lora_rank,
d_r = qk_rope_head_dim, d_n = qk_nope_head_dim, d_v = v_head_dim.

Why the two attention paths agree. kv_b_proj maps a latent c [d_c] to per-head K_nope = W_UK[h] c [d_n] and
V = W_UV[h] c [d_v]. With query q = (q_n [d_n], q_r [d_r]) and key k_t = (W_UK[h] c_t, k_r,t):
    score_t = q_n . (W_UK[h] c_t) + q_r . k_r,t = (W_UK[h]^T q_n) . c_t + q_r . k_r,t = [q_lat, q_r] . [c_t, k_r,t]
so the latent-space query q_lat = W_UK[h]^T q_n [d_c] scores the cached latent rows [c_t, k_r,t] directly, with
the same softmax scale. And by linearity
    out = sum_t p_t W_UV[h] c_t = W_UV[h] (sum_t p_t c_t),
so attending with the latents c_t as values [d_c] and applying W_UV[h] once afterwards gives the same output.
Prefill up-projects (S x H x (d_n + d_v) work per layer, compute-friendly); decode uses the absorbed form, whose
per-token reads are one d_c + d_r row instead of H x (d_n + d_r + d_v).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.attention.backend import AttentionMetadata, MLABackend
from kvserve.attention.mla import causal_attention
from kvserve.config import ModelConfig
from kvserve.distributed.parallel_state import all_reduce
from kvserve.distributed.sharding import local_range
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.embedding import LMHead, VocabEmbedding
from kvserve.layers.linear import Linear, column_parallel, row_parallel
from kvserve.layers.mlp import GatedMLP
from kvserve.layers.moe import is_stacked_experts, run_experts, split_stacked_experts
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding, apply_rotary
from kvserve.models.base import DecoderForCausalLM

CosSin = tuple[torch.Tensor, torch.Tensor]  # [T, 1, d_r] each
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class DeepseekConfig:
    """The MLA and MoE shape of a DeepSeek-V2/V3 model, read from its HF config dict."""

    is_v3: bool
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_routed_experts: int  # 0: every layer dense
    num_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring_func: str  # softmax (V2) or sigmoid (V3)
    topk_method: str  # greedy, group_limited_greedy (V2) or noaux_tc (V3: grouped, with score correction bias)
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope_theta: float
    rope_scaling: dict | None  # with `attention_factor` resolved as HF does (mscale / mscale_all_dim)
    rope_interleave: bool
    softmax_scale: float
    head_start: int = 0  # tensor parallelism: this rank's first head (num_heads are this rank's)

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> DeepseekConfig:
        """Build from the HF dict carried in `config.extra`; raises ValueError on an unsupported setting."""
        raw = config.extra
        if not raw.get("kv_lora_rank"):
            raise ValueError(f"{config.architecture} needs an HF config with kv_lora_rank and the other MLA fields")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported for DeepSeek models (only silu)")
        if raw.get("mlp_bias"):
            raise ValueError("mlp_bias is not supported for DeepSeek models")
        is_v3 = config.architecture == "DeepseekV3ForCausalLM"
        num_experts = raw.get("n_routed_experts") or 0
        topk_method = raw.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")
        if topk_method not in _TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {list(_TOPK_METHODS)}, got {topk_method!r}")
        scoring_func = raw.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be softmax or sigmoid, got {scoring_func!r}")
        n_group = raw.get("n_group") or 1
        if num_experts and num_experts % n_group:
            raise ValueError(f"n_routed_experts ({num_experts}) must be a multiple of n_group ({n_group})")
        nope, rope = int(raw["qk_nope_head_dim"]), int(raw["qk_rope_head_dim"])
        head_start, num_heads = local_range(config.num_heads)  # tensor parallelism: this rank's heads
        scaling = _rope_scaling(config.rope_scaling, config.max_position_embeddings)
        return cls(
            is_v3=is_v3, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
            num_layers=config.num_layers, num_heads=num_heads, head_start=head_start, rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=config.tie_word_embeddings, attention_bias=bool(raw.get("attention_bias")),
            q_lora_rank=raw.get("q_lora_rank") or None, kv_lora_rank=int(raw["kv_lora_rank"]),
            qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(raw["v_head_dim"]),
            intermediate_size=config.intermediate_size,
            moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
            num_routed_experts=num_experts, num_shared_experts=raw.get("n_shared_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
            first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
            moe_layer_freq=raw.get("moe_layer_freq") or 1,
            scoring_func=scoring_func,
            topk_method=topk_method, n_group=n_group, topk_group=raw.get("topk_group") or 1,
            norm_topk_prob=bool(raw.get("norm_topk_prob")),
            routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
            rope_theta=config.rope_theta, rope_scaling=scaling,
            # HF's DeepSeek-V2 always rotates interleaved pairs; V3 says so in `rope_interleave`.
            rope_interleave=not is_v3 or bool(raw.get("rope_interleave", True)),
            softmax_scale=_softmax_scale(nope + rope, scaling),
        )

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` has routed experts (else a dense MLP)."""
        return (self.num_routed_experts > 0 and index >= self.first_k_dense_replace
                and index % self.moe_layer_freq == 0)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched by `factor`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_scaling(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    """A copy of `scaling` with YaRN's `factor` and `attention_factor` filled in as HF computes them."""
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.setdefault("rope_type", scaling.get("type", "default"))
    if kind != "yarn":
        return scaling
    if scaling.get("truncate") is False:
        raise ValueError("rope_scaling with truncate=false is not supported for DeepSeek models")
    original = scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    factor = scaling.get("factor") or max_position_embeddings / original
    scaling["factor"] = factor
    if scaling.get("attention_factor") is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            scaling["attention_factor"] = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            scaling["attention_factor"] = _yarn_mscale(factor)
    return scaling


def _softmax_scale(qk_head_dim: int, scaling: dict | None) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 when a scaled RoPE sets mscale_all_dim."""
    scale = qk_head_dim ** -0.5
    if scaling and scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
        scale *= _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., D] pairs (x0, x1), (x2, x3), ... -> [..., D] as (x0, x2, ...,  x1, x3, ...).

    DeepSeek rotates interleaved pairs; the same permutation on queries and keys leaves their dot products
    unchanged, and in this layout the pairs are rotated by the usual rotate-half formula.
    """
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MLAAttention(nn.Module):
    """Multi-head Latent Attention: LoRA query, compressed KV latent cached, up-projected or absorbed attention."""

    def __init__(self, cfg: DeepseekConfig, attention_backend: MLABackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = attention_backend  # its MLA entry points read and write the latent cache
        # Tensor parallelism splits the heads (cfg.num_heads is this rank's, from cfg.head_start); the latent
        # projections and the latent cache are every rank's.
        first, heads, qk_dim = cfg.head_start, cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = column_parallel(cfg.hidden_size, [(first * qk_dim, heads * qk_dim)])
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = column_parallel(cfg.q_lora_rank, [(first * qk_dim, heads * qk_dim)])
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                         bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        kv_dim = cfg.qk_nope_head_dim + cfg.v_head_dim
        self.kv_b_proj = column_parallel(cfg.kv_lora_rank, [(first * kv_dim, heads * kv_dim)])
        self.o_proj = row_parallel((first * cfg.v_head_dim, heads * cfg.v_head_dim), cfg.hidden_size,
                                   bias=cfg.attention_bias)
        # kv_b_proj split per head for the absorbed decode, built by `process_weights_after_loading`
        # (buffers, so that `.to()` moves them; not persistent: derived from kv_b_proj).
        self.w_uk: torch.Tensor | None  # [H, d_n, d_c]
        self.w_uv: torch.Tensor | None  # [H, d_c, d_v]
        self.register_buffer("w_uk", None, persistent=False)
        self.register_buffer("w_uv", None, persistent=False)

    def process_weights_after_loading(self) -> None:
        """Split kv_b_proj into per-head W_UK [H, d_n, d_c] and W_UV^T [H, d_c, d_v] for the absorbed decode."""
        cfg = self.cfg
        # weight [H * (d_n + d_v), d_c] -> [H, d_n + d_v, d_c]
        w = self.kv_b_proj.weight.view(cfg.num_heads, -1, cfg.kv_lora_rank)
        self.w_uk = w[:, :cfg.qk_nope_head_dim].contiguous()  # [H, d_n, d_c]
        self.w_uv = w[:, cfg.qk_nope_head_dim:].transpose(1, 2).contiguous()  # [H, d_c, d_v]

    def forward(self, cos_sin: CosSin, hidden: torch.Tensor, kv_cache: LayerKVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size]; caches this step's latents first."""
        num_tokens = hidden.shape[0]
        q_nope, q_rope, latent = self.project(cos_sin, hidden)
        self.backend.write_latent(latent, kv_cache, metadata)
        out = hidden.new_empty(num_tokens, self.cfg.num_heads, self.cfg.v_head_dim)  # [T, H, d_v]
        num_decodes = metadata.num_decodes
        if num_decodes:
            out[:num_decodes] = self.attend_absorbed(q_nope[:num_decodes], q_rope[:num_decodes], kv_cache, metadata)
        for rows, latents in self.backend.prefill_latents(latent, kv_cache, metadata):  # latents [S, d_c + d_r]
            out[rows] = self.attend_expanded(q_nope[rows], q_rope[rows], latents)
        return self.o_proj(out.view(num_tokens, -1))  # [T, H * d_v] -> [T, hidden_size]

    def project(self, cos_sin: CosSin, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] -> q_nope [T, H, d_n], rotated q_rope [T, H, d_r], latent [T, d_c + d_r]."""
        cfg, num_tokens = self.cfg, hidden.shape[0]
        if cfg.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(num_tokens, cfg.num_heads, -1)  # [T, H * (d_n + d_r)] -> [T, H, d_n + d_r]
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(hidden).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        if cfg.rope_interleave:
            q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
        q_rope = apply_rotary(q_rope, cos_sin)
        k_rope = apply_rotary(k_rope[:, None], cos_sin)[:, 0]  # one key shared by all heads: [T, 1, d_r]
        return q_nope, q_rope, torch.cat([self.kv_a_layernorm(c_kv), k_rope], dim=-1)

    def attend_expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Prefill path: up-project latents [S, d_c + d_r] to per-head K/V; queries [n, H, *] -> [n, H, d_v]."""
        cfg, num_keys = self.cfg, latents.shape[0]
        c_kv, k_rope = latents.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(num_keys, cfg.num_heads, -1)  # [S, H * (d_n + d_v)] -> [S, H, d_n + d_v]
        k_nope, value = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        # The shared RoPE key joins every head: [S, d_r] -> [S, H, d_r] (a broadcast view before the copy).
        key = torch.cat([k_nope, k_rope[:, None].expand(-1, cfg.num_heads, -1)], dim=-1)  # [S, H, d_n + d_r]
        query = torch.cat([q_nope, q_rope], dim=-1)  # [n, H, d_n + d_r]
        return causal_attention(query, key, value, cfg.softmax_scale)

    def attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_cache: LayerKVCache,
                        metadata: AttentionMetadata) -> torch.Tensor:
        """Decode path: one query per request [B, H, *] against the cached latents -> [B, H, d_v]."""
        assert self.w_uk is not None and self.w_uv is not None, "absorbed decode before the weights were loaded"
        # Fold W_UK into the query: [H, B, d_n] @ [H, d_n, d_c] -> [H, B, d_c] -> [B, H, d_c]
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)
        query = torch.cat([q_latent, q_rope], dim=-1)  # [B, H, d_c + d_r]
        out_latent = self.backend.absorbed_decode(query, kv_cache, metadata, self.cfg.kv_lora_rank,
                                                  self.cfg.softmax_scale)  # [B, H, d_c]
        # Fold W_UV into the output: [H, B, d_c] @ [H, d_c, d_v] -> [H, B, d_v] -> [B, H, d_v]
        return torch.bmm(out_latent.transpose(0, 1), self.w_uv).transpose(0, 1)


class DeepseekRouter(nn.Module):
    """Picks each token's top-k routed experts and their weights, in float32 like the reference."""

    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_routed_experts, cfg.hidden_size), requires_grad=False)
        if cfg.topk_method == "noaux_tc":  # V3: a learned bias steers the choice, not the weights
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_routed_experts), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        cfg = self.cfg
        logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores
        if cfg.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()
        if cfg.topk_method != "greedy":
            choice = self._keep_top_groups(choice)
        expert_ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, k]
        weights = scores.gather(1, expert_ids)  # [T, k]
        return self._scale(weights), expert_ids

    def _keep_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask out (to -inf) the experts outside each token's topk_group best groups: [T, E] -> [T, E]."""
        cfg, num_tokens = self.cfg, choice.shape[0]
        grouped = choice.view(num_tokens, cfg.n_group, -1)  # [T, E] -> [T, G, E / G]
        if cfg.topk_method == "noaux_tc":  # V3 ranks a group by the sum of its two best experts
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:  # V2's group_limited_greedy by its best expert
            group_scores = grouped.amax(dim=-1)  # [T, G]
        top_groups = group_scores.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)  # [T, G]
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(num_tokens, -1)

    def _scale(self, weights: torch.Tensor) -> torch.Tensor:
        """norm_topk_prob and routed_scaling_factor, as V3 (always scale) and V2 (scale unless normalised) do."""
        cfg = self.cfg
        if cfg.norm_topk_prob and (cfg.is_v3 or cfg.num_experts_per_tok > 1):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            if not cfg.is_v3:
                return weights
        return weights * cfg.routed_scaling_factor


class DeepseekMoE(nn.Module):
    """Routed top-k experts plus always-on shared experts."""

    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__()
        self.gate = DeepseekRouter(cfg)
        # With tensor parallelism every rank holds a slice of every expert; the block sums over ranks once.
        self.experts = nn.ModuleList(GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size, reduce_results=False)
                                     for _ in range(cfg.num_routed_experts))
        self.shared_experts = (GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts,
                                        reduce_results=False) if cfg.num_shared_experts else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        weights, expert_ids = self.gate(hidden)  # [T, k] each
        out = run_experts(self.experts, hidden, weights, expert_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return all_reduce(out)


class DeepseekDecoderLayer(nn.Module):
    """Pre-norm MLA and (dense or MoE) feed-forward blocks with residual connections."""

    def __init__(self, cfg: DeepseekConfig, index: int, attention_backend: MLABackend) -> None:
        super().__init__()
        self.self_attn = MLAAttention(cfg, attention_backend)
        self.mlp: nn.Module = (DeepseekMoE(cfg) if cfg.is_moe_layer(index)
                               else GatedMLP(cfg.hidden_size, cfg.intermediate_size))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, cos_sin: CosSin, hidden: torch.Tensor, kv_cache: LayerKVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        hidden = hidden + self.self_attn(cos_sin, self.input_layernorm(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DeepseekModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, cfg: DeepseekConfig, max_position: int, attention_backend: MLABackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        # RoPE covers only the decoupled d_r part of queries and keys.
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(cfg, i, attention_backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(DecoderForCausalLM):
    """DeepSeek-V2/V3 causal LM with a latent KV cache; same interface as LlamaForCausalLM."""

    supports_kv_window = False  # the MLA attention path has no sinks + sliding window
    uses_mla = True
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: MLABackend) -> None:
        super().__init__()
        self.config = config
        self.cfg = DeepseekConfig.from_model_config(config)
        self.model = DeepseekModel(self.cfg, max_position, attention_backend)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.tie_weights()

    def kv_cache_specs(self, dtype: str) -> list[KVCacheSpec]:
        """One latent "head" per layer: d_c + d_r key elements, no value (the value is read from the latent)."""
        if dtype == "int4":
            raise ValueError("kv_cache_dtype='int4' is not supported for MLA models (DeepSeek-V2/V3); "
                             "use auto, int8 or fp8")
        spec = KVCacheSpec(1, self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim, 0, dtype)
        return [spec] * self.cfg.num_layers

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """Split transformers' stacked 3-D expert tensors into one tensor per expert (gate rows then up rows, like
        our fused gate_up_proj); the rest as every model does."""
        if is_stacked_experts(name):
            return split_stacked_experts(name, tensor, self.cfg.num_routed_experts)
        return super().checkpoint_tensors(name, tensor)
