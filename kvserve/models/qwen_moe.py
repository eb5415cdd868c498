"""Qwen2-MoE and Qwen3-MoE: Qwen2's (QKV bias) or Qwen3's (QK-norm) attention with sparse MoE feed-forward
layers (layers/moe.py, shared with DeepSeek).

The router is a softmax over the experts, top-k, renormalised when `norm_topk_prob`; Qwen2-MoE adds a shared
expert scaled by sigmoid(shared_expert_gate(x)). A layer is sparse unless it is in `mlp_only_layers` or off the
`decoder_sparse_step` stride; the others have a dense MLP of `intermediate_size`. The expert count is
`num_experts` (`num_local_experts` in transformers 5's Qwen3-MoE configs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.attention.backend import AttentionBackend
from kvserve.config import ModelConfig
from kvserve.distributed.parallel_state import all_reduce
from kvserve.layers.linear import Linear
from kvserve.layers.mlp import GatedMLP
from kvserve.layers.moe import is_stacked_experts, run_experts, split_stacked_experts
from kvserve.models.llama import LlamaForCausalLM


def num_experts(raw: dict) -> int:
    """Routed experts per sparse layer."""
    return raw.get("num_experts") or raw.get("num_local_experts") or 0


class QwenRouter(nn.Module):
    """Each token's top-k experts and their weights, in float32 like the reference."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (weights [T, k] float32, expert ids [T, k])."""
        probs = F.linear(hidden, self.weight).softmax(dim=-1, dtype=torch.float32)  # [T, E]
        weights, expert_ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, expert_ids


class QwenSparseMoe(nn.Module):
    """Routed experts, plus Qwen2-MoE's gated shared expert."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        raw, hidden = config.extra, config.hidden_size
        self.gate = QwenRouter(hidden, num_experts(raw), raw["num_experts_per_tok"],
                               bool(raw.get("norm_topk_prob", False)))
        # With tensor parallelism every rank holds a slice of every expert; the block sums over ranks once.
        self.experts = nn.ModuleList(GatedMLP(hidden, raw["moe_intermediate_size"], reduce_results=False)
                                     for _ in range(num_experts(raw)))
        shared = raw.get("shared_expert_intermediate_size") or 0
        self.shared_expert = GatedMLP(hidden, shared, reduce_results=False) if shared else None
        self.shared_expert_gate = Linear(hidden, 1) if shared else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H]."""
        weights, expert_ids = self.gate(hidden)
        out = run_experts(self.experts, hidden, weights, expert_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return all_reduce(out)


class QwenMoeForCausalLM(LlamaForCausalLM):
    """Qwen2-MoE / Qwen3-MoE: the Llama decoder with sparse feed-forward layers."""

    def __init__(self, config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> None:
        super().__init__(config, max_position, attention_backend)
        raw = config.extra
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported for {config.architecture}")
        step, dense = raw.get("decoder_sparse_step") or 1, set(raw.get("mlp_only_layers") or [])
        for index, layer in enumerate(self.model.layers):
            if num_experts(raw) and index not in dense and (index + 1) % step == 0:
                layer.mlp = QwenSparseMoe(config)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """transformers' stacked expert tensors split per expert; the rest as Llama's."""
        if is_stacked_experts(name):
            return split_stacked_experts(name, tensor, num_experts(self.config.extra))
        return super().checkpoint_tensors(name, tensor)
