"""CPU paged attention with a compiled decode kernel (native/paged_decode.c); prefill and the rest stay on torch_ref.

The kernel reads float32, float16 and bfloat16 caches (half the bytes, widened to float32 as read), int8 ones
(codes and per-token scales, a quarter of the bytes) and KIVI int4 ones (codes dequantized as read, each request's
incomplete block from its residual slot).

Why: a batched decode step on torch copies every sequence's blocks into a padded tensor, then SDPA reads the
copy again, so the KV cache is streamed about three times per layer. The C kernel reads each block once, in
place, and only up to each sequence's own length (64 decodes of 150-400 tokens, 3 of 9 heads, from a cold
cache: 1.1-1.5 vs 8-9 ms per layer on the 2-core CPU). Built on first use (kvserve.native); without a
compiler the engine stays on torch.
"""

from __future__ import annotations

import torch

from kvserve import native
from kvserve.attention import torch_ref
from kvserve.attention.backend import AttentionRequirements, CommonAttentionMetadata
from kvserve.attention.torch_backend import TorchAttentionBackend
from kvserve.attention.torch_metadata import TorchAttentionMetadata, build_torch_metadata
from kvserve.kv.kv_cache import LayerKVCache


def available() -> bool:
    """Whether the compiled kernel can run here."""
    return native.load("paged_decode") is not None


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch backend with the decode rows of float32, float16, bfloat16, int8 and int4 caches on the compiled
    kernel.

    Whether the kernel runs is decided once, here, from the cache: it reads those keys and values of one width
    without attention sinks + window. fp8 caches and MLA run torch_ref's decode (the fastest CPU path for them
    today).
    """

    name = "cpu"
    devices = ("cpu",)

    def __init__(self, needs: AttentionRequirements) -> None:
        super().__init__(needs)
        self.use_kernel = (needs.kv_cache_dtype in (*native.PAGED_KV_DTYPES, "int4") and not needs.use_window
                           and not needs.use_mla and needs.logits_soft_cap is None)
        # int8 caches under cpu_gguf_int8_activations: Q.K in integers, as llama.cpp computes it on a q8_0 K cache
        self.int8_queries = self.use_kernel and needs.int8_queries and needs.kv_cache_dtype == "int8"

    @classmethod
    def check_supported(cls, needs: AttentionRequirements) -> None:
        """The torch backend's checks on the CPU, and a kernel that builds."""
        super().check_supported(needs)
        if not available():
            raise ValueError("attention_backend='cpu' needs a C compiler with OpenMP (cc, or $CC) to build "
                             "kvserve/native/paged_decode.c")

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        """torch_ref's metadata; the kernel reads seq_lens (a sliding-window group's: each decode's range of
        keys), so no dense decode mask is built for it."""
        return build_torch_metadata(common, with_decode_mask=not self.use_kernel)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                metadata: TorchAttentionMetadata, scale: float) -> torch.Tensor:
        """torch_ref.paged_attention, with the decodes on the kernel where it serves this cache."""
        return torch_ref.paged_attention(query, key, value, cache, metadata, scale,
                                         decode=self._decode if self.use_kernel else None,
                                         soft_cap=self.logits_soft_cap)

    def _decode(self, query: torch.Tensor, cache: LayerKVCache, metadata: TorchAttentionMetadata,
                scale: float) -> torch.Tensor:
        """`decode` with this backend's queries (looked up per call, so a test may wrap it)."""
        return decode(query, cache, metadata, scale, self.int8_queries)


def decode(query: torch.Tensor, cache: LayerKVCache, metadata: TorchAttentionMetadata, scale: float,
           int8_queries: bool = False) -> torch.Tensor:
    """One query token per sequence: query [B, Hq, D] -> [B, Hq, D] (computed in float32, returned in query's dtype).
    `int8_queries` (an int8 cache): each query head rounded to 8 bits as the keys are, Q.K summed in integers.

    The kernel trusts the block tables: the runner's metadata builder has checked once per step that every
    sequence fits its table.
    """
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = cache.key.shape
    query32 = query.contiguous().float()
    tables, seq_lens = metadata.decode_block_tables, metadata.decode_seq_lens  # contiguous long [B, nb], [B]
    starts = None  # all keys from the table's first
    if metadata.decode_key_starts is not None:  # a sliding window: [start, end) of each table
        starts, seq_lens = metadata.decode_key_starts, metadata.decode_key_ends
    out = torch.empty_like(query32)
    if cache.is_int4:
        status = _decode_int4(query32, cache, metadata, scale, out)
        if status != 0:
            raise MemoryError("paged decode attention could not allocate its score buffers")
        return out.to(query.dtype)
    # int8: codes [nb, bs, Hkv, D] and scales [nb, bs, Hkv, 1]; float32 / float16 / bfloat16: elements, no scales
    scales = (cache.key_scale.data_ptr(), cache.value_scale.data_ptr()) if cache.is_quantized else (None, None)
    kind = native.paged_kv_kind(cache.key.dtype)
    status = native.load("paged_decode").paged_decode_kv(
        query32.data_ptr(), cache.key.data_ptr(), cache.value.data_ptr(), *scales, kind, int(int8_queries),
        tables.data_ptr(), seq_lens.data_ptr(), None if starts is None else starts.data_ptr(), out.data_ptr(), batch,
        num_kv_heads, num_heads // num_kv_heads, head_dim, block_size, tables.shape[1], scale)
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffers")
    return out.to(query.dtype)


def _decode_int4(query32: torch.Tensor, cache: LayerKVCache, metadata: TorchAttentionMetadata, scale: float,
                 out: torch.Tensor) -> int:
    """decode's int4 call: codes [nb, bs, Hkv, D / 2], float16 key parameters [nb, 1, Hkv, D] and value ones
    [nb, bs, Hkv, 1], the residual [slots, bs, Hkv, D] in the model's dtype. Returns the C status."""
    batch, num_heads, head_dim = query32.shape
    _, block_size, num_kv_heads, _ = cache.key.shape
    tables, residual = metadata.decode_block_tables, metadata.decode_residual
    parameters = (cache.key_scale, cache.key_zero, cache.value_scale, cache.value_zero)
    return native.load("paged_decode").paged_decode_int4(
        query32.data_ptr(), cache.key.data_ptr(), cache.value.data_ptr(), *(p.data_ptr() for p in parameters),
        cache.residual_key.data_ptr(), cache.residual_value.data_ptr(), native.paged_kv_kind(cache.residual_key.dtype),
        residual.columns.data_ptr(), residual.slots.data_ptr(), tables.data_ptr(), metadata.decode_seq_lens.data_ptr(),
        out.data_ptr(), batch, num_kv_heads, num_heads // num_kv_heads, head_dim, block_size, tables.shape[1], scale)
