"""AWQ's activation-aware scale search (Lin et al., 2023), per group of linear layers that share an input.

For a layer group with input x [N, in] and fused weight W [out, in], each input channel gets a scale
s = mean|x|^alpha (normalised so that sqrt(max * min) = 1); W's columns are multiplied by s before int4
round-to-nearest and the op that produces x divides by s, so the float model is unchanged and the salient
channels (large |x|) get finer quantization steps. alpha is chosen on a grid (0 = plain RTN) to minimise the
mean squared error of the layer's output, x @ (Q(W * s) / s)^T against x @ W^T, on calibration rows.

The groups of a Llama-family decoder layer (kvserve's fused modules; the producer absorbs 1/s):
- qkv_proj, produced by input_layernorm (its weight);
- o_proj, produced by v_proj (its rows and bias): attention output channel (head h, d) is a mix of v channel
  (KV head of h, d), so the scale is shared by the query heads of a KV head (grouped-query attention) by
  averaging their mean |x| first, and v's rows divide by the shared value;
- gate_up_proj, produced by post_attention_layernorm;
- down_proj, produced by up_proj (its rows): act(gate) * up / s = x / s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.config import ModelConfig
from kvserve.layers.quantization.rtn import fake_quantize_int4


@dataclass(frozen=True)
class ScalingGroup:
    """One search: our fused Linear `module`, the checkpoint weights whose columns take s, and the checkpoint
    tensors of the producing op whose rows (a norm: values) are divided by it."""

    module: str  # e.g. "model.layers.3.self_attn.qkv_proj"
    scaled_weights: tuple[str, ...]  # Hugging Face names of [out, in] weights: columns * s
    producers: tuple[str, ...]  # Hugging Face names of the producing op's tensors: dim 0 / s
    heads: tuple[int, int, int] | None = None  # (query heads, KV heads, head dim): o_proj's scale sharing

    def shared(self, values: torch.Tensor) -> torch.Tensor:
        """Per input channel values [in], averaged over the query heads of each KV head where the producer is
        v_proj; unchanged otherwise."""
        if self.heads is None:
            return values
        num_heads, num_kv_heads, head_dim = self.heads
        per_kv = values.view(num_kv_heads, num_heads // num_kv_heads, head_dim).mean(dim=1, keepdim=True)
        return per_kv.expand(-1, num_heads // num_kv_heads, -1).reshape(-1)  # [H * d]

    def producer_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale [in] in the producer's output channels: v_proj's [Hkv * d] for o_proj, else itself."""
        if self.heads is None:
            return scale
        num_heads, num_kv_heads, head_dim = self.heads
        return scale.view(num_kv_heads, num_heads // num_kv_heads, head_dim)[:, 0].reshape(-1)


def llama_scaling_groups(config: ModelConfig) -> list[ScalingGroup]:
    """The four groups of every decoder layer of a Llama-family model (Llama, Mistral, Qwen2, Qwen3)."""
    groups = []
    heads = (config.num_heads, config.num_kv_heads, config.head_dim)
    for index in range(config.num_layers):
        attn, mlp = f"model.layers.{index}.self_attn.", f"model.layers.{index}.mlp."
        v_tensors = (attn + "v_proj.weight", *((attn + "v_proj.bias",) if config.attention_bias else ()))
        groups += [
            ScalingGroup(attn + "qkv_proj", tuple(attn + f"{p}_proj.weight" for p in "qkv"),
                         (f"model.layers.{index}.input_layernorm.weight",)),
            ScalingGroup(attn + "o_proj", (attn + "o_proj.weight",), v_tensors, heads),
            ScalingGroup(mlp + "gate_up_proj", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                         (f"model.layers.{index}.post_attention_layernorm.weight",)),
            ScalingGroup(mlp + "down_proj", (mlp + "down_proj.weight",), (mlp + "up_proj.weight",)),
        ]
    return groups


def folded_scales(groups: list[ScalingGroup], scales: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each group's scale [in] (by module) -> (checkpoint weight -> its column scale, producer tensor -> its
    divisor); up_proj and v_proj are in both (columns for their own group, rows for the next)."""
    column_scales: dict[str, torch.Tensor] = {}
    divisors: dict[str, torch.Tensor] = {}
    for group in groups:
        scale = scales[group.module]
        column_scales.update(dict.fromkeys(group.scaled_weights, scale))
        divisors.update(dict.fromkeys(group.producers, group.producer_scale(scale)))
    return column_scales, divisors


@dataclass(frozen=True)
class SearchResult:
    """The chosen scale [in] and alpha, with the output error at that alpha and at alpha = 0 (plain RTN)."""

    scale: torch.Tensor
    alpha: float
    error: float
    rtn_error: float


def search_scale(x: torch.Tensor, weight: torch.Tensor, mean_abs: torch.Tensor, group: ScalingGroup,
                 group_size: int, grid: int) -> SearchResult:
    """The alpha in {0, 1/grid, ..., (grid-1)/grid} whose scale mean_abs^alpha gives the smallest layer-output
    MSE on rows x [N, in] for weight [out, in] quantized to int4 in `group_size` groups."""
    reference = x @ weight.t()  # [N, out]
    statistic = group.shared(mean_abs.clamp(min=1e-8))
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_error = float("nan")
    for step in range(grid):
        alpha = step / grid
        scale = statistic.pow(alpha).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        fake_quantized = fake_quantize_int4(weight * scale, group_size).div_(scale)  # [out, in]
        error = (x @ fake_quantized.t() - reference).pow(2).mean().item()
        if step == 0:
            rtn_error = error
        if best is None or error < best[0]:
            best = (error, alpha, scale)
    assert best is not None
    return SearchResult(best[2], best[1], best[0], rtn_error)
