"""AutoAWQ's GEMM checkpoint layout for 4-bit weights, to and from plain [out, in] codes (rtn.Int4Groups).

Per linear layer, in input-major order (W^T):
- `qweight` int32 [in, out / 8]: eight 4-bit codes per int32, nibble k (bits 4k..4k+3) holding output column
  8c + AWQ_PACK_ORDER[k] of int32 column c;
- `qzeros` int32 [in / group, out / 8]: the zero points, packed the same way;
- `scales` float16 [in / group, out].
W^T[i, o] = (q[i, o] - zero[i // group, o]) * scale[i // group, o].
"""

from __future__ import annotations

import torch

from kvserve.layers.quantization.rtn import Int4Groups

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an int32 holds column AWQ_PACK_ORDER[k] of its eight
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of the eight is in nibble AWQ_UNPACK_ORDER[j]
AWQ_TENSORS = ("qweight", "qzeros", "scales")
PACK = 8  # codes per int32


def awq_quantization_config(group_size: int) -> dict:
    """config.json's `quantization_config` for a 4-bit AutoAWQ GEMM checkpoint."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """codes [rows, cols] in 0..15 (cols a multiple of 8) -> int32 [rows, cols / 8] in AWQ's nibble order."""
    rows, cols = codes.shape
    eights = codes.to(torch.int64).view(rows, cols // PACK, PACK)[:, :, list(AWQ_PACK_ORDER)]
    shifts = 4 * torch.arange(PACK, dtype=torch.int64)
    packed = (eights << shifts).sum(dim=2)  # [rows, cols / 8], 0 .. 2^32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ's nibble order -> codes [rows, cols] uint8 in 0..15."""
    rows = packed.shape[0]
    shifts = 4 * torch.arange(PACK, dtype=torch.int32, device=packed.device)
    nibbles = (packed[:, :, None] >> shifts) & 15  # [rows, cols / 8, 8]; & 15 drops the sign's extension
    return nibbles[:, :, list(AWQ_UNPACK_ORDER)].reshape(rows, -1).to(torch.uint8)


def to_awq(groups: Int4Groups) -> dict[str, torch.Tensor]:
    """[out, in] codes -> AWQ's `qweight`, `qzeros` and `scales` (float16)."""
    return {"qweight": pack_awq(groups.q.t()), "qzeros": pack_awq(groups.zero.t()),
            "scales": groups.scale.t().to(torch.float16).contiguous()}


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Groups:
    """AWQ's tensors of one layer (or one output shard) -> [out, in] codes, float32 scales and zero points;
    ValueError naming the disagreement if their shapes do not fit together."""
    num_in, packed_out = qweight.shape
    groups = scales.shape[0]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"AWQ qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if tuple(qzeros.shape) != (groups, packed_out) or scales.shape[1] != packed_out * PACK:
        raise ValueError(f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} (expected [in, out/8], [groups, out/8], [groups, out])")
    if groups == 0 or num_in % groups:
        raise ValueError(f"AWQ scales have {groups} groups, which do not divide the input size {num_in}")
    return Int4Groups(unpack_awq(qweight).t().contiguous(), scales.t().float().contiguous(),
                      unpack_awq(qzeros).t().contiguous())
