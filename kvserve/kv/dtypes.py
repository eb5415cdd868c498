"""The one table of KV-cache dtypes: what each stores, its bytes (scales and zero points included), its torch dtypes.

Read by the config (the allowed `kv_cache_dtype` values), the cache spec (bytes per token), the cache allocator
(torch storage dtypes), the quantizer and the `kv-memory` calculator. Pure Python: torch dtypes are named by
strings, and `torch_dtype` imports torch only when called. Adding a KV dtype starts with one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# int4 keys: a scale and zero point per channel, shared by a group of tokens that is one KV block. 64 tokens make
# the cache 3.5x smaller than float16 at d_h = 64, scales included.
DEFAULT_INT4_GROUP_SIZE = 64

# Where a quantized dtype keeps its parameters (scales, zero points):
# "token": per token per KV head; "channel": per channel per KV head, shared by a group of tokens.
ParamScope = Literal["token", "channel"]


@dataclass(frozen=True)
class KVDtype:
    """One `kv_cache_dtype`: element bytes, the scales / zero points beside them, and the torch storage dtypes.

    `element_bytes` None is `auto`: the model dtype. `storage_dtype` names the torch dtype of the stored elements
    (codes when quantized: int4 packs two per uint8, fp8 keeps raw e4m3 bytes as uint8); None for `auto`.
    """

    name: str
    element_bytes: Fraction | None
    storage_dtype: str | None
    description: str
    param_dtype: str | None = None  # torch dtype of the scales and zero points
    param_bytes: int = 0  # bytes of one scale or zero point
    num_params: int = 0  # parameters per scope: 1 (symmetric: a scale) or 2 (asymmetric: a scale and a zero point)
    key_params: ParamScope | None = None
    value_params: ParamScope | None = None
    max_code: float = 0.0  # symmetric codes: the largest magnitude the storage holds

    @property
    def is_quantized(self) -> bool:
        """Whether values are stored as codes plus scales."""
        return self.num_params > 0

    def head_bytes_per_token(self, key_dim: int, value_dim: int, model_dtype_bytes: int = 2,
                             group_size: int = DEFAULT_INT4_GROUP_SIZE) -> Fraction:
        """Bytes per token of one KV head holding `key_dim` key and `value_dim` value elements.

        Per-channel parameters are amortised over the `group_size` tokens sharing them; `model_dtype_bytes` is
        read by `auto` only. MLA caches no separate value (`value_dim` 0): no value parameters either.
        """
        element = Fraction(model_dtype_bytes) if self.element_bytes is None else self.element_bytes
        total = Fraction(0)
        if key_dim:
            total += key_dim * element + self._param_bytes(self.key_params, key_dim, group_size)
        if value_dim:
            total += value_dim * element + self._param_bytes(self.value_params, value_dim, group_size)
        return total

    def _param_bytes(self, scope: ParamScope | None, dim: int, group_size: int) -> Fraction:
        """Parameter bytes per token of one head's `dim` keys or values."""
        params = Fraction(self.num_params * self.param_bytes)
        if scope == "token":
            return params
        if scope == "channel":
            if group_size < 1:
                raise ValueError(f"an {self.name} KV cache needs group_size >= 1 (tokens sharing a key scale)")
            return dim * params / group_size
        return Fraction(0)


_SYMMETRIC_8BIT = dict(element_bytes=Fraction(1), param_dtype="float32", param_bytes=4, num_params=1,
                       key_params="token", value_params="token")

# The table. Float rows are what `auto` stores for each model dtype; quantized rows are kv_cache_dtype choices.
KV_DTYPES: dict[str, KVDtype] = {d.name: d for d in (
    KVDtype("auto", None, None, "model dtype (float16/bfloat16: 2 bytes), no scales"),
    KVDtype("float32", Fraction(4), "float32", "4 bytes, no scales"),
    KVDtype("float16", Fraction(2), "float16", "2 bytes, no scales"),
    KVDtype("bfloat16", Fraction(2), "bfloat16", "2 bytes, no scales"),
    KVDtype("int8", storage_dtype="int8", max_code=127.0, **_SYMMETRIC_8BIT,
            description="1 byte + one float32 scale per token per KV head, for K and for V"),
    # KIVI: keys per channel (outliers live in a few channels), values per token; asymmetric, float16 parameters.
    KVDtype("int4", Fraction(1, 2), "uint8", param_dtype="float16", param_bytes=2, num_params=2,
            key_params="channel", value_params="token",
            description="KIVI: 0.5 byte; V: float16 scale + zero point per token per head; K: float16 scale + "
                        f"zero point per channel per {DEFAULT_INT4_GROUP_SIZE} tokens (one KV block)"),
    # fp8 e4m3 codes are kept as raw bytes (uint8): CPU index_copy_/gather are not implemented for float8 tensors.
    KVDtype("fp8", storage_dtype="uint8", max_code=448.0, **_SYMMETRIC_8BIT,
            description="e4m3, 1 byte + one float32 scale per token per KV head, for K and for V"),
)}

MODEL_DTYPES = tuple(name for name, d in KV_DTYPES.items() if d.element_bytes is not None and not d.is_quantized)
QUANTIZED_KV_DTYPES = tuple(name for name, d in KV_DTYPES.items() if d.is_quantized)
# The values of the kv_cache_dtype option: the model dtype, a float dtype of its own (a float32 model's cache in
# float16 or bfloat16: half the bytes, as llama.cpp's default f16 cache), or a quantized format.
KV_CACHE_DTYPES = ("auto", *MODEL_DTYPES, *QUANTIZED_KV_DTYPES)
STORAGE_DTYPES = (*MODEL_DTYPES, *QUANTIZED_KV_DTYPES)  # what a layer's cache spec may store


def kv_dtype(name: str) -> KVDtype:
    """The table row of `name`, or a ValueError naming the choices."""
    if name not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


def model_dtype_bytes(dtype: str) -> int:
    """Bytes per element of a model dtype (float32, float16, bfloat16)."""
    return int(KV_DTYPES[dtype].element_bytes)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (imports torch: call it only where tensors are made)."""
    import torch

    return getattr(torch, name)
