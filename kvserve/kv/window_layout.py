"""The sinks + window KV layout on the runner side: each step's window metadata (held block columns, the sink
query rotation) and the visibility rule as tensors. The block-level rule itself is kv/sinks_window.py."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvserve.kv.sinks_window import SinksWindow

# RoPE angle offsets [n] -> (cos, sin) [n, 1, D] in the model's dtype (the model's RotaryEmbedding.rotation).
Rotation = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class WindowMetadata:
    """Attention sinks + sliding window (StreamingLLM): query q sees keys k < num_sinks and q - W < k <= q.

    Keys are cached rotated at their true positions, so a query and its window keep true relative distances.
    A sink must instead look as far away as in a compacted cache (sinks at 0..S-1, the window right after them,
    the query at S + W - 1): the sink scores use the query rotated back by delta = max(0, q - (S + W - 1)),
    i.e. placed at position S + W - 1. Sinks sit in the first columns of every gathered table.
    """

    num_sinks: int
    window: int
    sink_rotation: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [T, 1, D] of the angle -delta per query
    decode_in_window: torch.Tensor  # [num_decodes] bool: delta > 0, the sinks are shifted for this query
    held_columns: list[list[int]]  # per request: the logical block index of each held block, in table order


class SinksWindowLayout:
    """Builds the window part of a step's attention metadata (one per engine with kv_window set)."""

    def __init__(self, policy: SinksWindow, rotation: Rotation) -> None:
        self.policy = policy
        self.rotation = rotation

    @classmethod
    def for_model(cls, policy: SinksWindow | None, model: nn.Module, dtype: torch.dtype) -> SinksWindowLayout | None:
        """The layout of one model's attention, with its own RoPE (a draft's may differ from its target's); None
        without a window."""
        if policy is None:
            return None
        return cls(policy, functools.partial(model.model.rotary.rotation, dtype=dtype))

    def step_metadata(self, positions: torch.Tensor, num_decodes: int,
                      held_columns: list[list[int]]) -> WindowMetadata:
        """Each query's rotation back to the sink-query position S + W - 1 (see WindowMetadata)."""
        policy = self.policy
        delta = (positions - (policy.num_sinks + policy.window - 1)).clamp_min(0)  # [T]
        cos, sin = self.rotation(delta)
        return WindowMetadata(policy.num_sinks, policy.window, (cos, -sin), delta[:num_decodes] > 0, held_columns)


def key_positions(block_columns: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    """Token positions of the held blocks' slots, in gathered order: [len(block_columns) * block_size]."""
    columns = torch.tensor(block_columns, dtype=torch.long, device=device)
    return (columns[:, None] * block_size + torch.arange(block_size, device=device)).flatten()


def window_visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int, num_sinks: int) -> torch.Tensor:
    """key_pos [..., L], query_pos [..., n] -> [..., n, L] bool: a sink, or one of the query's last `window` tokens."""
    keys, queries = key_pos[..., None, :], query_pos[..., :, None]
    return (keys <= queries) & ((keys < num_sinks) | (keys > queries - window))
