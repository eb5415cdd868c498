"""Per-layer description of what the KV cache stores, so MHA/GQA/MQA, MLA and quantized caches share one pool."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from kvserve.kv.dtypes import KV_DTYPES, STORAGE_DTYPES, KVDtype


@dataclass(frozen=True)
class KVCacheSpec:
    """One attention layer's cache layout: per token, `num_kv_heads` keys of `key_dim` and values of `value_dim`.

    MLA stores a single latent "head" with `value_dim == 0` (the value is read from the key latent).
    int4 shares each key channel's scale across a group of `group_size` tokens: one KV block.
    A sliding-window layer (`sliding_window` W) lets query q see keys q - W < k <= q only: it holds just the blocks
    its window can still see (kv/kv_groups.py).
    """

    num_kv_heads: int
    key_dim: int
    value_dim: int
    dtype: str
    group_size: int = 0
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {list(STORAGE_DTYPES)}, got {self.dtype!r}")

    @property
    def elements_per_token(self) -> int:
        """Cached elements per token in this layer (keys and values)."""
        return self.num_kv_heads * (self.key_dim + self.value_dim)

    @property
    def is_quantized(self) -> bool:
        """Whether values are stored as codes plus scales."""
        return self.kv_dtype.is_quantized

    @property
    def kv_dtype(self) -> KVDtype:
        """This layer's row of the KV dtype table."""
        return KV_DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> Fraction:
        """Cached bytes per token in this layer, scales included (int4 key scales amortised over a group)."""
        return self.num_kv_heads * self.kv_dtype.head_bytes_per_token(self.key_dim, self.value_dim,
                                                                      group_size=self.group_size)


def bytes_per_token(specs: list[KVCacheSpec]) -> Fraction:
    """Bytes of KV cache one token takes across all layers."""
    return sum((spec.bytes_per_token for spec in specs), Fraction(0))


def bytes_per_block(specs: list[KVCacheSpec], block_size: int) -> int:
    """Bytes one block of `block_size` tokens takes across all layers (a whole number)."""
    return int(bytes_per_token(specs) * block_size)


def num_blocks_for_budget(specs: list[KVCacheSpec], block_size: int, budget_bytes: int) -> int:
    """How many whole blocks of `block_size` tokens fit in `budget_bytes`."""
    return budget_bytes // bytes_per_block(specs, block_size)
