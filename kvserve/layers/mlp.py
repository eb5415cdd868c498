"""The gated feed-forward every model here uses: one fused gate/up projection, an activation of the gate times
the up half, a down projection (Llama's SwiGLU, Gemma's GELU-tanh, the MoE models' experts)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kvserve.distributed.sharding import local_range
from kvserve.layers.activation import silu_and_mul
from kvserve.layers.linear import column_parallel, row_parallel


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate/up fused into one projection. With tensor parallelism each rank
    holds a slice of the intermediate size (gate/up column-parallel, down row-parallel); `reduce_results=False`
    leaves the sum over ranks to the caller (a mixture of experts sums once, after all its experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int,
                 activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
                 reduce_results: bool = True) -> None:
        super().__init__()
        part = local_range(intermediate_size)
        self.gate_up_proj = column_parallel(hidden_size, [part, part])
        self.down_proj = row_parallel(part, hidden_size, reduce_results=reduce_results)
        self.activation = activation  # [..., 2 * I] (gate then up) -> [..., I]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden_size] -> [T, hidden_size]."""
        return self.down_proj(self.activation(self.gate_up_proj(hidden)))
