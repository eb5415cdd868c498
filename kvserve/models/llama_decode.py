"""A Llama decode step's layers in one compiled call (native/llama_decode.c), where the step allows it.

The module path pays Python and torch dispatch for ~20 ops per layer, more than the 4-bit matmuls themselves
take at batch 1. `FusedLlamaDecode` describes the loaded model to the kernel once (weight pointers, norms, the
KV-cache tensors) and then runs the layers of a step whose tokens are all single-token decodes on float32, 16-bit,
int8 or int4 caches. Same kernels as the module path (GGUF blocks or float32 rows, RMSNorm, paged decode attention);
RoPE and SiLU in C. Batches beyond the kernels' rows run split: the modules' matmuls, the rest of each layer in C.
Anything else (prefill chunks, fp8 caches, windows, Qwen3's QK-norm) returns None and the caller runs the modules.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from kvserve import native
from kvserve.attention.torch_metadata import TorchAttentionMetadata
from kvserve.kv.kv_cache import LayerKVCache
from kvserve.layers import gguf_ops
from kvserve.layers.linear import Linear
from kvserve.layers.quantization.gguf import DEQUANTIZED_GEMM_ROWS, GgufLinearMethod

_MAX_SEGMENTS = 4  # llama_decode.c's MAX_SEGMENTS
_KINDS = native.GGUF_KERNEL_TYPES + native.INTERLEAVED_TYPES  # llama_decode.c's segment kinds
_F32 = _KINDS.index("f32")
# Float32 weights: decode steps of up to 3 tokens run whole here, larger ones split (oneDNN's matmuls). Whole
# against split, bundled model, ms a step: 2 decodes 25 / 45, 3: 29 / 37, 4: 37 / 35, 8: 49 / 36, 12: 66 / 46.
FLOAT32_MAX_TOKENS = 3
# GGUF weights all in interleaved tiles: any decode batch would do; this bounds the step's scratch buffers.
INTERLEAVED_MAX_TOKENS = 256


class _Segment(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("rows", ctypes.c_int64), ("first_row", ctypes.c_int64),
                ("weight", ctypes.c_void_p)]


class _Linear(ctypes.Structure):
    _fields_ = [("num_segments", ctypes.c_int64), ("segments", _Segment * _MAX_SEGMENTS), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_attention_norm", ctypes.c_void_p), ("qkv", _Linear),
                ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("key_cache", ctypes.c_void_p),
                ("value_cache", ctypes.c_void_p), ("key_scale", ctypes.c_void_p), ("value_scale", ctypes.c_void_p),
                ("kv_kind", ctypes.c_int64), ("key_zero", ctypes.c_void_p), ("value_zero", ctypes.c_void_p),
                ("residual_key", ctypes.c_void_p), ("residual_value", ctypes.c_void_p)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("hidden", "num_heads", "num_kv_heads", "head_dim",
                                                     "intermediate", "block_size", "num_layers",
                                                     "int8_activations", "int8_queries")] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class FusedLlamaDecode:
    """The kernel's description of one loaded Llama model and its KV caches."""

    def __init__(self, model: nn.Module, kv_caches: list[LayerKVCache], int8_queries: bool = False) -> None:
        config = model.config
        layers = model.model.layers
        method = layers[0].mlp.down_proj.method
        # The most decodes a step runs here: GGUF blocks, fewer than the rows from which the modules dequantize
        # and multiply with BLAS, or INTERLEAVED_MAX_TOKENS where every run is in interleaved tiles (their 8-bit
        # kernels beat that at any row count); float32 weights, FLOAT32_MAX_TOKENS (the kernels take rows eight at
        # a time, reading the weights again for each eight, where oneDNN's packed matmuls read them once).
        self.max_tokens = FLOAT32_MAX_TOKENS
        if isinstance(method, GgufLinearMethod):
            linears = [m for m in layers.modules() if isinstance(m, Linear)]
            interleaved = all(run.interleaved for linear in linears for run in linear.weight.segments)
            self.max_tokens = INTERLEAVED_MAX_TOKENS if interleaved else DEQUANTIZED_GEMM_ROWS - 1
        self.layers = (_Layer * len(layers))(*(_layer(layer, cache) for layer, cache in zip(layers, kv_caches,
                                                                                             strict=True)))
        self.shape = _Shape(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                            config.intermediate_size, kv_caches[0].key.shape[1], len(layers),
                            int(getattr(method, "int8_activations", False)), int(int8_queries),
                            layers[0].input_layernorm.eps,
                            layers[0].self_attn.attn.scale)
        library = native.load("llama_decode")
        self.kernel = library.llama_decode_layers
        self.attend, self.silu_mul = library.llama_decode_attention, library.llama_silu_mul  # the split step's

    @staticmethod
    def supports(model: nn.Module, kv_caches: list[LayerKVCache], decode_kernel: bool) -> bool:
        """Whether the model and caches are what the kernel computes: a Llama without QK-norm, float32, every
        Linear on GGUF blocks or float32 rows, caches the paged decode kernel reads (`decode_kernel`: the
        attention backend chose it, which it does for float32, float16, bfloat16, int8 and int4 caches without a
        window)."""
        if type(model).__name__ not in ("LlamaForCausalLM", "Phi3ForCausalLM") or model.config.use_qk_norm \
                or not decode_kernel:
            return False
        if any(spec.sliding_window for spec in model.kv_cache_specs("float32")):  # its attention sees everything
            return False
        if native.load("llama_decode") is None or not kv_caches:
            return False
        linears = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
        return all(_segments(linear) is not None for linear in linears)

    def forward(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: TorchAttentionMetadata) -> torch.Tensor | None:
        """Final hidden states [T, hidden] of a step of T single-token decodes, or None for any other step. Up to
        `max_tokens` decodes run whole in C; larger batches run split (`_split_layers`)."""
        num_tokens = input_ids.shape[0]
        if metadata.num_decodes != num_tokens or metadata.prefills or metadata.window is not None:
            return None
        hidden = model.model.embed_tokens(input_ids).contiguous()  # a fresh [T, H], updated in place
        cos, sin = model.model.rotary.lookup(positions, torch.float32)  # [T, 1, D] each
        cos, sin = cos.contiguous(), sin.contiguous()
        tables, seq_lens = metadata.decode_block_tables, metadata.decode_seq_lens
        int4 = (None, None, None)  # an int4 cache: each decode's residual slot, then its tail after the write
        if metadata.int4 is not None:
            residual = metadata.decode_residual
            int4 = (metadata.int4.decode_slots.data_ptr(), residual.columns.data_ptr(), residual.slots.data_ptr())
        step = (cos.data_ptr(), sin.data_ptr(), metadata.slot_mapping.data_ptr(), tables.data_ptr(),
                seq_lens.data_ptr(), tables.shape[1], *int4)
        if num_tokens <= self.max_tokens:
            status = self.kernel(ctypes.byref(self.layers), ctypes.byref(self.shape), hidden.data_ptr(), num_tokens,
                                 *step)
        else:
            status = self._split_layers(model, hidden, step)
        if status != 0:
            raise MemoryError("the fused decode step could not allocate its buffers")
        return model.model.norm(hidden)

    def _split_layers(self, model: nn.Module, hidden: torch.Tensor, step: tuple[int, ...]) -> int:
        """hidden [T, H] through every layer, in place: the matmuls through the layers' Linear methods (where
        BLAS beats the kernels: oneDNN's packed float32 matmuls, dequantized GGUF blocks), RoPE, the K/V writes,
        attention and SiLU in C between them. The module path but for SiLU's last bit and ~20 dispatched ops a
        layer (a 16-decode float32 step spent a third of its time outside its matmuls). Returns the C status."""
        config, num_tokens = model.config, hidden.shape[0]
        query = hidden.new_empty(num_tokens, config.num_heads * config.head_dim)  # scratch
        attended = torch.empty_like(query)
        act = hidden.new_empty(num_tokens, config.intermediate_size)
        layers, shape = ctypes.byref(self.layers), ctypes.byref(self.shape)
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            qkv = attention.qkv_proj(layer.input_layernorm(hidden)).contiguous()  # [T, (Hq + 2 Hkv) D]
            status = self.attend(layers, shape, index, qkv.data_ptr(), query.data_ptr(), attended.data_ptr(),
                                 num_tokens, *step)
            if status != 0:
                return status
            hidden += attention.o_proj(attended)
            gate_up = mlp.gate_up_proj(layer.post_attention_layernorm(hidden)).contiguous()  # [T, 2 I]
            self.silu_mul(gate_up.data_ptr(), act.data_ptr(), num_tokens, config.intermediate_size)
            hidden += mlp.down_proj(act)
        return 0


def _layer(layer: nn.Module, cache: LayerKVCache) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    int4 = (cache.key_zero, cache.value_zero, cache.residual_key, cache.residual_value) if cache.is_int4 else ()
    return _Layer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                  _linear(attention.qkv_proj), _linear(attention.o_proj), _linear(mlp.gate_up_proj),
                  _linear(mlp.down_proj), cache.key.data_ptr(), cache.value.data_ptr(),
                  *(None if scale is None else scale.data_ptr() for scale in (cache.key_scale, cache.value_scale)),
                  native.KV_INT4 if cache.is_int4 else native.paged_kv_kind(cache.key.dtype),
                  *(tensor.data_ptr() for tensor in int4))


def _linear(layer: Linear) -> _Linear:
    segments = _segments(layer)
    described = _Linear(len(segments), (_Segment * _MAX_SEGMENTS)(*segments))
    described.bias = None if layer.bias is None else layer.bias.data_ptr()
    return described


def _segments(layer: Linear) -> list[_Segment] | None:
    """The kernel's runs of a Linear: its GGUF runs, or its float32 weight as one F32 run; None if neither."""
    if isinstance(layer.method, GgufLinearMethod):
        runs = [_Segment(_KINDS.index(gguf_ops.KERNEL_NAMES[run.qtype] + ("x8" if run.interleaved else "")),
                         run.weight.shape[0], run.start, run.weight.data_ptr()) for run in layer.weight.segments]
        return runs if len(runs) <= _MAX_SEGMENTS else None
    weight = layer.weight
    if weight.dtype != torch.float32 or not weight.is_contiguous() or layer.in_features % 32:
        return None
    return [_Segment(_F32, layer.out_features, 0, weight.data_ptr())]
