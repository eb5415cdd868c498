"""The attention seam: one common metadata per step, and the interface every attention backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvserve.kv.int4_residual import Int4WritePlan
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.kv.window_layout import WindowMetadata

# A backend's own per-step metadata, as its `build_metadata` returns it; models pass it through untouched.
AttentionMetadata = Any


@dataclass
class CommonAttentionMetadata:
    """Per-step attention inputs every backend starts from, built once per step by the runner.

    The packed batch holds `num_decode_tokens` single-token requests first, then the multi-token ones
    (prompts, prompt chunks, recomputes). Device tensors are long; the host lists carry the same numbers as
    plain ints so that builders never read a device tensor back.
    """

    positions: torch.Tensor  # [T] long: each token's position in its sequence
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) per token
    query_start_loc: torch.Tensor  # [B + 1] long: first row of each request in the packed batch, then T
    seq_lens: torch.Tensor  # [B] long: tokens in the cache after this step (cached + new)
    num_computed_tokens: torch.Tensor  # [B] long: tokens already cached before this step
    block_table: torch.Tensor  # [B, max_blocks] long, padded with 0 (with a window: the held blocks only)
    num_reqs: int
    num_decode_tokens: int  # decodes are the first rows (and requests), one token each
    block_size: int
    query_start_loc_host: list[int]  # [B + 1]
    seq_lens_host: list[int]  # [B]
    num_blocks_host: list[int]  # [B]: the filled columns of each block_table row
    max_query_len: int
    window: WindowMetadata | None = None  # sinks + sliding window layout
    int4: Int4WritePlan | None = None  # int4 residual layout
    # A sliding-window KV group (kv/kv_groups.py): query q sees keys q - W < k <= q, and each table row starts at
    # the first block its window sees, key position first_key_position[i] (gathered columns are shifted by it).
    sliding_window: int | None = None
    first_key_position: torch.Tensor | None = None  # [B] long
    first_key_position_host: list[int] | None = None  # [B]

    @property
    def num_tokens(self) -> int:
        """Rows of the packed batch."""
        return self.query_start_loc_host[-1]


@dataclass
class GroupedAttentionMetadata:
    """A hybrid KV cache's step metadata: one backend metadata per KV group (its tables, its window); a layer
    reads its group's."""

    groups: list[AttentionMetadata]
    group_of: list[int]  # each layer's group

    def for_layer(self, index: int) -> AttentionMetadata:
        """The metadata layer `index` attends with."""
        return self.groups[self.group_of[index]]


@dataclass(frozen=True)
class AttentionRequirements:
    """What a model's KV cache asks of an attention backend, known from the config before the model is built."""

    device: torch.device
    kv_cache_dtype: str  # the cache's storage dtype: float32 / float16 / bfloat16 (plain), int8, fp8, int4
    use_window: bool  # attention sinks + sliding window (kv_window)
    use_mla: bool  # Multi-head Latent Attention: one latent "head", no separate value
    use_sliding_window: bool = False  # a KV group whose layers see only their last W tokens (kv/kv_groups.py)
    logits_soft_cap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    int8_queries: bool = False  # an int8 cache's decodes round their queries to 8 bits for Q.K (the cpu backend)


class AttentionBackend(ABC):
    """Writes a step's K/V into the paged cache and attends over it; one instance serves every layer.

    A backend declares what it serves in the class attributes below; `check_supported` turns them into the
    error a user sees. Each backend derives its own per-step metadata from the common one in `build_metadata`
    (once per step, shared by every layer): never in a global, never per call.
    """

    name: ClassVar[str]
    devices: ClassVar[tuple[str, ...]]  # torch device types it runs on; () = any
    kv_cache_dtypes: ClassVar[frozenset[str]]
    supports_window: ClassVar[bool]
    supports_mla: ClassVar[bool]
    supports_sliding_window: ClassVar[bool] = False
    supports_logits_soft_cap: ClassVar[bool] = False
    # Whether decode steps may replay CUDA graphs (runner/cuda_graphs.py): `build_metadata` reads no host value
    # that changes between steps of one batch size, and `forward` neither syncs nor allocates on the host.
    supports_cuda_graphs: ClassVar[bool] = False

    @classmethod
    def check_supported(cls, needs: AttentionRequirements) -> None:
        """Raise a ValueError naming the first thing this backend cannot serve."""
        prefix = f"attention_backend={cls.name!r} cannot serve this model"
        if cls.devices and needs.device.type not in cls.devices:
            raise ValueError(f"{prefix}: it runs on {' / '.join(cls.devices)} only, not {needs.device.type}")
        if needs.kv_cache_dtype not in cls.kv_cache_dtypes:
            raise ValueError(f"{prefix}: kv_cache_dtype {needs.kv_cache_dtype!r} is not supported "
                             f"(supported: {sorted(cls.kv_cache_dtypes)})")
        if needs.use_window and not cls.supports_window:
            raise ValueError(f"{prefix}: it has no attention sinks + sliding window (kv_window)")
        if needs.use_mla and not cls.supports_mla:
            raise ValueError(f"{prefix}: it has no Multi-head Latent Attention (MLA)")
        if needs.use_sliding_window and not cls.supports_sliding_window:
            raise ValueError(f"{prefix}: it has no sliding-window layers (use attention_backend='torch')")
        if needs.logits_soft_cap is not None and not cls.supports_logits_soft_cap:
            raise ValueError(f"{prefix}: it has no attention logit soft-capping (use attention_backend='torch')")

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> AttentionMetadata:
        """This backend's metadata for one step, derived from the common one (passed to every layer)."""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write key/value [T, Hkv, D] to the cache, then attend: query [T, Hq, D] -> output [T, Hq, D]."""


class MLABackend(ABC):
    """The cache side of Multi-head Latent Attention, for backends with `supports_mla`.

    The latent cache holds one row [d_c + d_rope] per token (see attention/mla.py); the model's weights stay in
    the model (up-projection, absorption).
    """

    @abstractmethod
    def write_latent(self, latent: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata) -> None:
        """Store this step's latents [T, d_c + d_rope] at their slots."""

    @abstractmethod
    def prefill_latents(self, latent: torch.Tensor, cache: LayerKVCache,
                        metadata: AttentionMetadata) -> list[tuple[slice, torch.Tensor]]:
        """Per multi-token request: (its rows in the batch, all its latents [S, D]: cached prefix, then fresh)."""

    @abstractmethod
    def absorbed_decode(self, query: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, kv_lora_rank: int,
                        scale: float) -> torch.Tensor:
        """Latent-space queries [B, H, d_c + d_rope] of the decodes -> attention-weighted latents [B, H, d_c]."""
