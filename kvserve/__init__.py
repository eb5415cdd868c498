"""kvserve: an LLM inference engine built around a paged KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.structured import StructuredOutputsParams

if TYPE_CHECKING:
    from kvserve.llm import LLM

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "RequestMetrics"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`kvserve.LLM`, imported on first use: the pure-Python parts (scheduler, KV manager) must import without
    torch, and importing any of them runs this package's __init__ first."""
    if name == "LLM":
        from kvserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
