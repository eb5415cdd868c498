"""Round-to-nearest weight quantization: int8 per output row (symmetric) and int4 per group (asymmetric).

Used at load by the int8 and int4 linear methods and by `kvserve quantize` (which writes the int4 codes in
AutoAWQ's layout: the zero point and scale here are AutoAWQ's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (128, 64, 32)  # the default's preference order: the largest that divides a layer's input
INT4_MAX = 15
INT8_MAX = 127
_MIN_RANGE = 1e-5  # a constant group (all weights equal) still gets a usable scale


@dataclass
class Int4Groups:
    """Group-wise asymmetric int4 codes: W ~= (q - zero) * scale, one scale and zero per `group_size` inputs."""

    q: torch.Tensor  # [out, in] uint8, 0..15
    scale: torch.Tensor  # [out, in / group_size] float32
    zero: torch.Tensor  # [out, in / group_size] uint8, 0..15

    @property
    def group_size(self) -> int:
        """Inputs per group."""
        return self.q.shape[1] // self.scale.shape[1]

    def minimum(self) -> torch.Tensor:
        """-zero * scale [out, groups]: W = q * scale + minimum (the kernel's form)."""
        return -self.zero.float() * self.scale

    def dequantize(self) -> torch.Tensor:
        """float32 W [out, in]."""
        zero = self.zero.float().repeat_interleave(self.group_size, dim=1)
        return (self.q.float() - zero) * self.scale.repeat_interleave(self.group_size, dim=1)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q int8 [out, in], scale float32 [out]) with W ~= q * scale, |q| <= 127 (symmetric)."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0 with any scale
    q = torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int4_groups(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32
                         ) -> Int4Groups:
    """W [out, in] -> int4 codes per `group_size` inputs: scale = (max - min) / 15 (rounded to `scale_dtype`,
    which is what a checkpoint stores: float16 for AutoAWQ), zero = round(-min / scale), q = round(W / scale)
    + zero, both clamped to 0..15. The range always includes 0 (as GPTQ's, unlike AutoAWQ's): a group of one
    sign would otherwise need a zero point outside 0..15 and clamp its values."""
    num_out, num_in = weight.shape
    groups, scale, zero = _int4_groups(weight, group_size, scale_dtype)
    q = (torch.round(groups / scale[:, :, None]) + zero[:, :, None]).clamp(0, INT4_MAX)
    return Int4Groups(q.to(torch.uint8).view(num_out, num_in), scale, zero.to(torch.uint8))


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """quantize_int4_groups(weight, group_size).dequantize() [out, in], in fewer passes (AWQ's search runs it
    once per candidate scale)."""
    groups, scale, zero = _int4_groups(weight, group_size, torch.float32)
    scale, zero = scale[:, :, None], zero[:, :, None]  # [out, groups, 1]
    return groups.div(scale).round_().add_(zero).clamp_(0, INT4_MAX).sub_(zero).mul_(scale).view(weight.shape)


def _int4_groups(weight: torch.Tensor, group_size: int,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W as [out, groups, group] float32, scale [out, groups], zero [out, groups] as floats)."""
    num_out, num_in = weight.shape
    check_group_size(num_in, group_size)
    groups = weight.float().view(num_out, num_in // group_size, group_size)
    low, high = groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)
    scale = ((high - low).clamp(min=_MIN_RANGE) / INT4_MAX).to(scale_dtype).float()
    zero = torch.round(-low / scale).clamp(0, INT4_MAX)
    return groups, scale, zero


def check_group_size(in_features: int, group_size: int) -> None:
    """ValueError unless `group_size` is a multiple of 32 (the kernel's chunk) that divides `in_features`."""
    if group_size <= 0 or group_size % 32 or in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not fit input size {in_features}: it must be a "
                         f"multiple of 32 that divides the input size")


def default_group_size(in_features: int) -> int:
    """The largest of 128, 64, 32 that divides `in_features` (SmolLM2-135M's 576 -> 64); ValueError if none."""
    for size in INT4_GROUP_SIZES:
        if in_features % size == 0:
            return size
    raise ValueError(f"int4 needs an input size that is a multiple of 32, got {in_features}")
