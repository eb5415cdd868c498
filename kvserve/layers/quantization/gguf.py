"""GGUF weights computed on in their file's block formats (Q4_0 ... Q6_K): no float copy is ever made.

A layer's `weight` is one uint8 parameter holding its checkpoint shards' bytes back to back (a fused QKV may
mix formats: Q4_K_M files store V in Q6_K). `weight.segments` lists the runs of one format; `apply` runs the
compiled kernel once per run, into its columns of the output. Float matrices that reach such a layer (an F16 LM
head) are kept as F32 rows of the same kernel. With 8-bit activations, Q4_0 / Q4_1 / Q8_0 runs of 8k rows are kept
with eight rows interleaved (gguf_ops.interleave_rows8: the same bytes in another order), which their kernels read
3-4x faster than the row-major ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from gguf import GGMLQuantizationType
from torch import nn

from kvserve.layers import gguf_ops
from kvserve.layers.quantization.base import LinearMethod
from kvserve.loader.gguf import GgufTensor
from kvserve.loader.model_loader import set_weight_loader

# From this many rows (prefill chunks) a layer dequantizes its weight once and multiplies with BLAS: the
# kernels re-decode each block for every four rows, which costs more than one decode pass plus MKL's GEMM from
# 32-64 rows on (SmolLM2's four layer shapes, AVX2, 2 threads; 128 rows: 21.3 ms in kernels, 12.9 ms this way).
DEQUANTIZED_GEMM_ROWS = 48
# That GEMM runs on panels of this many output rows, so that its temporary stays a few MB however wide the layer
# (the whole 49,152-row LM head would be 113 MB of float32 per call, and the server's peak memory with it).
DEQUANTIZED_PANEL_ROWS = 1024


class Segment(NamedTuple):
    """A run of output rows in one format."""

    qtype: GGMLQuantizationType
    start: int  # its first output row
    weight: torch.Tensor  # [rows, row_bytes] uint8
    interleaved: bool  # tiles of eight rows (gguf_ops.interleave_rows8), not the file's row order


class GgufLinearMethod(LinearMethod):
    """float32 activations x [T, in] against GGUF-quantized W [out, in] (CPU, layers/gguf_ops.py); with
    `int8_activations`, x is rounded to 8 bits per 32 values for the block formats, as llama.cpp does."""

    weight_format = "gguf"

    def __init__(self, int8_activations: bool = False) -> None:
        self.int8_activations = int8_activations

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """An empty uint8 `weight` filled shard by shard at load, and a float `bias` [out] as usual."""
        layer.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        layer.weight.shards = {}  # shard id -> GgufTensor until process_weights_after_loading
        layer.weight.segments = []
        set_weight_loader(layer.weight, lambda param, tensor, shard_id: self._load(layer, param, tensor, shard_id),
                          len(layer.output_sizes))
        layer.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        if layer.bias is not None:
            set_weight_loader(layer.bias, layer.weight_loader, len(layer.output_sizes))

    @staticmethod
    def _load(layer: nn.Module, param: nn.Parameter, tensor: GgufTensor | torch.Tensor, shard_id: int | None) -> None:
        """Keep one checkpoint shard: a GgufTensor as it is, a float matrix as F32 rows."""
        rows = layer.output_sizes[shard_id or 0]
        if not isinstance(tensor, GgufTensor):
            dense = tensor.to(torch.float32).contiguous()
            tensor = GgufTensor(dense.view(torch.uint8).view(dense.shape[0], -1), GGMLQuantizationType.F32,
                                tuple(dense.shape))
        if tensor.shape != (rows, layer.in_features):
            raise ValueError(f"has shape {tensor.shape}, expected {(rows, layer.in_features)}")
        if not gguf_ops.supports(tensor.qtype, layer.in_features):
            raise ValueError(f"is {tensor.qtype.name}, which kvserve cannot compute on (it can: "
                             f"{', '.join(t.name for t in gguf_ops.KERNEL_NAMES)}); load with quantization='none'")
        param.shards[shard_id or 0] = tensor

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Lay the shards' bytes end to end in `weight` and record the runs of one format (once: a tied LM head
        shares the embedding's parameter)."""
        param = layer.weight
        if not param.shards:
            return
        shards = [param.shards[index] for index in sorted(param.shards)]
        param.data = torch.cat([shard.data.reshape(-1) for shard in shards])
        runs: list[list] = []  # [ggml type, first output row, first byte, rows]
        first_row = offset = 0
        for shard in shards:
            if runs and runs[-1][0] == shard.qtype:
                runs[-1][3] += shard.shape[0]
            else:
                runs.append([shard.qtype, first_row, offset, shard.shape[0]])
            first_row, offset = first_row + shard.shape[0], offset + shard.data.numel()
        row_bytes = {qtype: gguf_ops.row_bytes(qtype, layer.in_features) for qtype, *_ in runs}
        param.segments = [self._segment(qtype, start, param.data[byte:byte + rows * row_bytes[qtype]].view(rows, -1))
                          for qtype, start, byte, rows in runs]
        # What `apply` calls, resolved once: a decode step makes ~120 of these calls (kernel, reads 8-bit blocks,
        # W*, rows, first column).
        param.plan = [self._kernel(segment) + (segment.weight.data_ptr(), segment.weight.shape[0], segment.start)
                      for segment in param.segments]
        param.shards = {}

    def _segment(self, qtype: GGMLQuantizationType, start: int, weight: torch.Tensor) -> Segment:
        """A run, interleaved in place where its 8-bit-activation kernel reads tiles of eight rows."""
        if not (self.int8_activations and gguf_ops.interleavable(qtype, weight.shape[0])):
            return Segment(qtype, start, weight, False)
        weight.copy_(gguf_ops.interleave_rows8(weight, qtype))
        return Segment(qtype, start, weight, True)

    def _kernel(self, segment: Segment) -> tuple:
        """(the matmul for a run, whether it reads 8-bit activation blocks)."""
        if segment.interleaved:
            return gguf_ops.interleaved_int8_kernel(segment.qtype), True
        if self.int8_activations and segment.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return gguf_ops.int8_kernel(segment.qtype), True
        return gguf_ops.kernel(segment.qtype), False

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] float32 -> [T, out]: one kernel call per run of one format, into its output columns. From
        DEQUANTIZED_GEMM_ROWS rows, runs without interleaved tiles dequantize and multiply with BLAS instead."""
        x = x.contiguous()
        rows, num_out = x.shape[0], layer.out_features
        y = x.new_empty(rows, num_out)
        blocks = None
        for segment, (kernel, reads_blocks, weight_address, num_rows, start) in zip(layer.weight.segments,
                                                                                   layer.weight.plan, strict=True):
            if rows >= DEQUANTIZED_GEMM_ROWS and not segment.interleaved:
                self._dequantized_gemm(segment, x, y[:, start:start + num_rows], layer.in_features)
                continue
            if reads_blocks and blocks is None:
                blocks = gguf_ops.quantize_activations(x)
            source = blocks if reads_blocks else x
            kernel(source.data_ptr(), weight_address, y.data_ptr() + 4 * start, rows, layer.in_features, num_rows,
                   num_out)
        return y if layer.bias is None else y.add_(layer.bias)

    @staticmethod
    def _dequantized_gemm(segment: Segment, x: torch.Tensor, out: torch.Tensor, in_features: int) -> None:
        """out [T, rows] = x [T, in] @ W^T with the run's W (the file's row order: interleaved runs never come here)
        dequantized panel by panel for this call (exact float32 values, as the float kernels use)."""
        for first in range(0, segment.weight.shape[0], DEQUANTIZED_PANEL_ROWS):
            rows = segment.weight[first:first + DEQUANTIZED_PANEL_ROWS]
            panel = gguf_ops.dequantize_rows(rows, segment.qtype, torch.arange(rows.shape[0]), in_features)
            torch.mm(x, panel.t(), out=out[:, first:first + rows.shape[0]])

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] dequantized -> [T, in] float32."""
        (segment,) = layer.weight.segments
        weight, rows = segment.weight, ids
        if segment.interleaved:  # the tiles holding the ids, back in the file's order: id 8t + k is row k of tile t
            rows = gguf_ops.checked_ids(ids.reshape(-1), weight.shape[0])
            tiles = weight.view(-1, 8 * weight.shape[1])[rows // 8].view(-1, weight.shape[1])
            weight, rows = gguf_ops.deinterleave_rows8(tiles, segment.qtype), torch.arange(rows.numel()) * 8 + rows % 8
        values = gguf_ops.dequantize_rows(weight, segment.qtype, rows, layer.in_features)
        return values.view(*ids.shape, layer.in_features)
