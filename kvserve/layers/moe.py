"""Mixture-of-experts pieces the MoE models share (DeepSeek-V2/V3, Qwen2-MoE, Qwen3-MoE): the dispatch of tokens
to their chosen experts (each a layers/mlp.py GatedMLP), and transformers' stacked expert tensors split per
expert."""

from __future__ import annotations

import torch
from torch import nn


def run_experts(experts: nn.ModuleList, hidden: torch.Tensor, weights: torch.Tensor,
                expert_ids: torch.Tensor) -> torch.Tensor:
    """Each token through its chosen experts, summed with its weights: hidden [T, H], weights (float32) and
    expert_ids [T, k] -> [T, H]. One batched call per expert chosen by any token, in ascending expert order (the
    references' order, so that the float sums match)."""
    out = torch.zeros_like(hidden)
    for expert in torch.unique(expert_ids).tolist():
        rows, slots = torch.where(expert_ids == expert)  # tokens choosing it, and where in their top-k
        expert_out = experts[expert](hidden[rows])  # [n, H]
        out.index_add_(0, rows, expert_out * weights[rows, slots, None].to(hidden.dtype))
    return out


def is_stacked_experts(name: str) -> bool:
    """Whether a checkpoint tensor is transformers' stacked experts (`...mlp.experts.gate_up_proj` / `down_proj`)."""
    return name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def split_stacked_experts(name: str, tensor: torch.Tensor, num_experts: int) -> list[tuple[str, torch.Tensor]]:
    """gate_up_proj [E, 2I, H] or down_proj [E, H, I] -> E tensors named per expert (`...experts.{e}.gate_up_proj
    .weight`: gate rows then up rows, like GatedMLP's fused projection)."""
    prefix, _, kind = name.rpartition(".")
    if tensor.shape[0] != num_experts:
        raise ValueError(f"checkpoint tensor {name!r}: has {tensor.shape[0]} experts, the config says {num_experts}")
    return [(f"{prefix}.{index}.{kind}.weight", tensor[index]) for index in range(num_experts)]
