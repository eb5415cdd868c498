"""Per-layer description of what the KV cache stores, so MHA/GQA/MQA, MLA and quantized caches share one pool."""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per element of each storage dtype; kept as names so this module imports no torch.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8": 1}
# Quantized storage keeps one float32 scale per token per KV head, for keys and for values.
QUANTIZED = {"int8", "fp8"}
SCALE_BYTES = 4


@dataclass(frozen=True)
class KVCacheSpec:
    """One attention layer's cache layout: per token, `num_kv_heads` keys of `key_dim` and values of `value_dim`.

    MLA stores a single latent "head" with `value_dim == 0` (the value is read from the key latent).
    """

    num_kv_heads: int
    key_dim: int
    value_dim: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"KV cache dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def elements_per_token(self) -> int:
        """Cached elements per token in this layer (keys and values)."""
        return self.num_kv_heads * (self.key_dim + self.value_dim)

    @property
    def is_quantized(self) -> bool:
        """Whether values are stored as codes plus per-token scales."""
        return self.dtype in QUANTIZED

    @property
    def bytes_per_token(self) -> int:
        """Cached bytes per token in this layer, scales included."""
        scales = self.num_kv_heads * (1 + (self.value_dim > 0)) * SCALE_BYTES if self.is_quantized else 0
        return self.elements_per_token * DTYPE_BYTES[self.dtype] + scales


def bytes_per_token(specs: list[KVCacheSpec]) -> int:
    """Bytes of KV cache one token takes across all layers."""
    return sum(spec.bytes_per_token for spec in specs)


def num_blocks_for_budget(specs: list[KVCacheSpec], block_size: int, budget_bytes: int) -> int:
    """How many whole blocks of `block_size` tokens fit in `budget_bytes`."""
    return budget_bytes // (bytes_per_token(specs) * block_size)
