"""Picks the paged-attention backend for a device: Triton on CUDA, the pure-torch reference elsewhere."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from kvserve.attention import torch_ref

# Same call shape as torch_ref.paged_attention: (query, key, value, cache, metadata, scale) -> output.
PagedAttention = Callable[..., torch.Tensor]
_CHOICES = ("auto", "triton", "torch")


@functools.cache
def select_attention(device: torch.device) -> PagedAttention:
    """The backend for `device`; KVSERVE_ATTENTION=triton|torch forces one (read once per device).

    Cached: models call this every forward, so the environment is looked at only the first time
    (tests that flip the variable call `select_attention.cache_clear()`).
    """
    choice = os.environ.get("KVSERVE_ATTENTION", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"KVSERVE_ATTENTION must be one of {list(_CHOICES)}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return torch_ref.paged_attention
    try:
        from kvserve.attention import triton_attention
    except ImportError as error:
        if choice == "auto":  # CUDA without a usable triton: the reference still runs there
            return torch_ref.paged_attention
        raise ValueError(f"KVSERVE_ATTENTION=triton needs the triton package: {error}") from error
    if device.type != "cuda" and not triton_attention.IS_INTERPRETED:
        raise ValueError(f"KVSERVE_ATTENTION=triton on {device.type} needs TRITON_INTERPRET=1 "
                         "(Triton's CPU interpreter) set before triton is first imported")
    return triton_attention.triton_paged_attention
