"""AutoAWQ GEMM checkpoints (4-bit, zero point), computed on the int4 method's kernel.

The checkpoint's `qweight`, `qzeros` and `scales` (awq_format.py) are kept per output shard as they arrive
(a fused QKV gets q_proj's, k_proj's and v_proj's); after loading they are converted once into the int4
method's layout, `weight` / `weight_scale` / `weight_min`, and dropped. The group size is read from their shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers import int_ops
from kvserve.layers.quantization.awq_format import AWQ_TENSORS, PACK, from_awq
from kvserve.layers.quantization.int4 import Int4LinearMethod
from kvserve.layers.quantization.rtn import check_group_size
from kvserve.loader.model_loader import set_weight_loader


class AwqLinearMethod(Int4LinearMethod):
    """Loads AWQ tensors, then computes as Int4LinearMethod."""

    weight_format = "awq"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """`qweight`, `qzeros`, `scales` holding their shards until processing (no `weight` until then), `bias`."""
        self.create_bias(layer, out_features, bias)
        layer.weight = None  # the int4 layout's, made by process_weights_after_loading
        for name in AWQ_TENSORS:
            param = nn.Parameter(torch.empty(0, dtype=torch.int32), requires_grad=False)
            param.shards = {}  # shard id -> the checkpoint tensor
            set_weight_loader(param, lambda param, tensor, shard_id: self._keep(layer, param, tensor, shard_id),
                              len(layer.output_sizes))
            setattr(layer, name, param)

    @staticmethod
    def _keep(layer: nn.Module, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
        """Keep one shard's tensor; its columns are the shard's output rows (packed eight per int32 but for
        `scales`)."""
        rows = layer.output_sizes[shard_id or 0]
        packed = tensor.dtype == torch.int32
        columns = rows // PACK if packed else rows
        if tensor.dim() != 2 or tensor.shape[1] != columns or rows % PACK:
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected [*, {columns}] for {rows} output rows "
                             f"(AWQ packs eight per int32)")
        param.shards[shard_id or 0] = tensor

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Convert the shards into the int4 layout (codes two per byte, float32 scales and minima)."""
        if layer.weight is not None:
            return
        shards = [from_awq(*(getattr(layer, name).shards[index] for name in AWQ_TENSORS))
                  for index in range(len(layer.output_sizes))]
        group_sizes = {shard.group_size for shard in shards}
        if len(group_sizes) != 1 or shards[0].q.shape[1] != layer.in_features:
            raise ValueError(f"AWQ shards of a {layer.in_features}-input layer have input sizes "
                             f"{[shard.q.shape[1] for shard in shards]} and group sizes {sorted(group_sizes)}")
        check_group_size(layer.in_features, shards[0].group_size)
        for name in AWQ_TENSORS:
            delattr(layer, name)
        q = torch.cat([shard.q for shard in shards])
        scale = torch.cat([shard.scale for shard in shards])
        minimum = torch.cat([shard.minimum() for shard in shards])
        for name, tensor in zip(("weight", "weight_scale", "weight_min"),
                                (int_ops.pack_nibbles(q), scale, minimum), strict=True):
            setattr(layer, name, nn.Parameter(tensor, requires_grad=False))
