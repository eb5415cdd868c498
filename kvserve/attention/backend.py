"""Attention metadata: everything a paged-attention kernel needs about one step, built once per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class PrefillSeq:
    """One request computing several tokens this step (a prompt, a prompt chunk, or a recompute)."""

    query_start: int  # offset of its first query token in the packed batch
    query_len: int  # tokens computed this step
    seq_len: int  # tokens in the cache after this step (cached prefix + query_len)
    block_table: torch.Tensor  # [num_blocks] long


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer.

    The packed batch holds `num_decodes` single-token queries first, then the prefill tokens.
    """

    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot (block * block_size + offset) per token
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long, padded with 0
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size] bool: key position < seq_len
    prefills: list[PrefillSeq]


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache and attends over it."""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 key_cache: torch.Tensor, value_cache: torch.Tensor,
                 metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] -> output [T, Hq, D]."""
        ...
