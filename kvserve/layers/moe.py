"""Mixture-of-experts pieces the MoE models share (DeepSeek-V2/V3, Qwen2-MoE, Qwen3-MoE): the SwiGLU expert, the
dispatch of tokens to their chosen experts, and transformers' stacked expert tensors split per expert."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers.activation import silu_and_mul
from kvserve.layers.linear import Linear


class ExpertMLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection (dense layers, routed and shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, output_sizes=[intermediate_size] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(hidden)))


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
    .weight`: gate rows then up rows, like ExpertMLP's fused projection)."""
    prefix, _, kind = name.rpartition(".")
    if tensor.shape[0] != num_experts:
        raise ValueError(f"checkpoint tensor {name!r}: has {tensor.shape[0]} experts, the config says {num_experts}")
    return [(f"{prefix}.{index}.{kind}.weight", tensor[index]) for index in range(num_experts)]
