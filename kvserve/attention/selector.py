"""Picks the paged-attention backend for a device: Triton on CUDA; on CPU the compiled decode kernel when it
builds, else the pure-torch reference."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from kvserve.attention import torch_ref

# Same call shape as torch_ref.paged_attention: (query, key, value, cache, metadata, scale) -> output.
PagedAttention = Callable[..., torch.Tensor]
_CHOICES = ("auto", "triton", "cpu", "torch")


@functools.cache
def select_attention(device: torch.device) -> PagedAttention:
    """The backend for `device`; KVSERVE_ATTENTION=triton|cpu|torch forces one (read once per device).

    Cached: models call this every forward, so the environment is looked at only the first time
    (tests that flip the variable call `select_attention.cache_clear()`).
    """
    choice = os.environ.get("KVSERVE_ATTENTION", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"KVSERVE_ATTENTION must be one of {list(_CHOICES)}, got {choice!r}")
    if choice == "torch":
        return torch_ref.paged_attention
    if choice == "cpu" and device.type != "cpu":
        raise ValueError(f"KVSERVE_ATTENTION=cpu runs on the CPU only, not {device.type}")
    if choice == "cpu" or (choice == "auto" and device.type == "cpu"):
        return _cpu_backend(required=choice == "cpu")
    if choice == "auto" and device.type != "cuda":
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


def _cpu_backend(required: bool) -> PagedAttention:
    """The compiled CPU decode kernel, or (auto) the torch reference where it cannot be built."""
    from kvserve.attention import cpu_native

    if cpu_native.available():
        return cpu_native.paged_attention
    if required:
        raise ValueError("KVSERVE_ATTENTION=cpu needs a C compiler with OpenMP (cc, or $CC) to build "
                         "kvserve/native/paged_decode.c")
    return torch_ref.paged_attention
