"""The gated feed-forward every model here uses: one fused gate/up projection, an activation of the gate times
the up half, a down projection (Llama's SwiGLU, Gemma's GELU-tanh, the MoE models' experts)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kvserve.layers.activation import silu_and_mul
from kvserve.layers.linear import Linear


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate/up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int,
                 activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, output_sizes=[intermediate_size] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.activation = activation  # [..., 2 * I] (gate then up) -> [..., I]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        return self.down_proj(self.activation(self.gate_up_proj(hidden)))
