"""The linear layer: checkpoint-layout weights, computed by the linear method chosen at load."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.distributed.parallel_state import all_reduce, tp_group
from kvserve.distributed.sharding import Range
from kvserve.layers.quantization.base import LinearMethod
from kvserve.layers.quantization.unquantized import UnquantizedLinearMethod
from kvserve.loader.model_loader import check_shape


class Linear(nn.Module):
    """y = x @ W^T + b with W [out, in] as in the checkpoint; `method` holds and applies the weights.

    `output_sizes` splits the output of a fused projection (QKV, gate/up) into the checkpoint's shards, in
    order: shard i fills output rows sum(output_sizes[:i]) onwards. The method is UnquantizedLinearMethod until
    the platform sets the one for its device and dtype (`set_method`), before the weights are loaded.

    Tensor parallelism (sizes are then this rank's): a column-parallel layer keeps `output_ranges[i]`, the
    (start, length) of checkpoint shard i's rows (zero rows pad it to output_sizes[i]: a vocabulary split in
    equal parts); a row-parallel one keeps the checkpoint's columns `input_range`, and sums its output over the
    ranks (`reduce_results`; a mixture of experts sums once, after its experts) with the bias added once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 output_sizes: list[int] | None = None, *, output_ranges: list[Range] | None = None,
                 input_range: Range | None = None, reduce_results: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = output_sizes or [out_features]
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"output_sizes {self.output_sizes} do not add up to out_features={out_features}")
        self.output_ranges, self.input_range = output_ranges, input_range
        self.reduce_results = reduce_results and input_range is not None
        self.method: LinearMethod = UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        out = self.method.apply(self, x)
        return all_reduce(out) if self.reduce_results else out

    def set_method(self, method: LinearMethod) -> None:
        """Compute with `method`; the platform calls this before loading. A method of another weight format
        replaces the parameters with its own (created on the same device)."""
        if method.weight_format != self.method.weight_format:
            device = self.weight.device
            method.create_weights(self, self.in_features, self.out_features, self.bias is not None)
            self.to(device)
        self.method = method

    def process_weights_after_loading(self) -> None:
        """Let the method derive its copies (packed layouts) from the loaded weights."""
        self.method.process_weights_after_loading(self)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
        """Copy a checkpoint weight [out, in] or bias [out], or shard `shard_id` of a fused one, into place."""
        target = param.data
        if shard_id is not None:
            start = sum(self.output_sizes[:shard_id])
            target = target.narrow(0, start, self.output_sizes[shard_id])  # output rows of this shard
        check_shape(target, tensor)
        target.copy_(tensor)

    def checkpoint_part(self, name: str, tensor: torch.Tensor, shard_id: int | None) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` ("weight" [out, in] or "bias" [out]; shard `shard_id` of
        a fused one): the whole tensor without tensor parallelism."""
        if self.output_ranges is None and self.input_range is None:
            return tensor
        if name not in ("weight", "bias"):
            raise ValueError(f"is a {name!r} tensor, which tensor parallelism cannot split (only weights [out, in] "
                             "and biases)")
        if self.output_ranges is not None:
            start, length = self.output_ranges[shard_id or 0]
            tensor = _pad_rows(tensor.narrow(0, start, length), self.output_sizes[shard_id or 0])
        if self.input_range is not None:
            if name == "bias":  # added once, after the sum over ranks
                return tensor if tp_group().is_driver else torch.zeros_like(tensor)
            tensor = tensor.narrow(1, *self.input_range)
        return tensor


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows` (a zero GGUF block is zeros in every format)."""
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    if isinstance(tensor, torch.Tensor):
        return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, missing))
    return tensor.pad_rows(rows)


def column_parallel(in_features: int, output_ranges: list[Range], bias: bool = False) -> Linear:
    """A Linear keeping rows `output_ranges` of each checkpoint shard (a plain one without tensor parallelism)."""
    sizes = [length for _, length in output_ranges]
    sharded = tp_group().world_size > 1
    return Linear(in_features, sum(sizes), bias, sizes, output_ranges=output_ranges if sharded else None)


def row_parallel(input_range: Range, out_features: int, bias: bool = False, reduce_results: bool = True) -> Linear:
    """A Linear keeping columns `input_range` of the checkpoint's weight, its outputs summed over the ranks (a plain
    one without tensor parallelism)."""
    sharded = tp_group().world_size > 1
    return Linear(input_range[1], out_features, bias, input_range=input_range if sharded else None,
                  reduce_results=reduce_results)
