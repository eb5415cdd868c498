"""Chooses the attention backend once, at engine construction, from the `attention_backend` option.

auto: on CUDA the Triton kernels where triton imports (else torch); on the CPU the compiled decode kernel
where it builds (else torch); a backend that cannot serve the model's cache is passed over.
"""

from __future__ import annotations

from kvserve.attention.backend import AttentionBackend, AttentionRequirements
from kvserve.attention.torch_backend import TorchAttentionBackend
from kvserve.config import ATTENTION_BACKENDS

# Preference of `auto` per device type; torch serves everything, so it always ends the list.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}


def create_attention_backend(name: str, needs: AttentionRequirements) -> AttentionBackend:
    """The backend `name` (or auto's pick) for a cache with these needs; ValueError if it cannot serve them."""
    if name != "auto":
        return backend_class(name)(needs)
    for candidate in _AUTO_ORDER.get(needs.device.type, ("torch",)):
        try:
            return backend_class(candidate)(needs)
        except ValueError:  # not built, not installed, or not for this cache: the next one
            continue
    raise AssertionError("unreachable: the torch backend serves every cache")


def backend_class(name: str) -> type[AttentionBackend]:
    """The class registered under `name` (imported on demand: triton is heavy and optional)."""
    if name == "torch":
        return TorchAttentionBackend
    if name == "cpu":
        from kvserve.attention.cpu_native import CpuAttentionBackend

        return CpuAttentionBackend
    if name == "triton":
        try:
            from kvserve.attention.triton_attention import TritonAttentionBackend
        except ImportError as error:
            raise ValueError(f"attention_backend='triton' needs the triton package: {error}") from error
        return TritonAttentionBackend
    raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, got {name!r}")
