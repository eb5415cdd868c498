"""Fixtures for loader tests: the bundled GGUF, tiny random HF models, a tiny GGUF writer."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from gguf_writing import add_model_shape

from kvserve.loader import GgufSource, open_model

TINY_DIMS: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}

# HF sub-module name -> GGUF name, written out independently of the loader's own table.
_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@pytest.fixture(scope="session")
def bundled_source() -> GgufSource:
    """The bundled SmolLM2 GGUF opened once per session (metadata only, ~2 s)."""
    source = open_model(None)
    assert isinstance(source, GgufSource)
    return source


@pytest.fixture(scope="session")
def gguf_tokenizer(bundled_source: GgufSource) -> Any:
    """The bundled model's tokenizer built by our loader (~5 s)."""
    return bundled_source.load_tokenizer()


def make_tiny_model(model_type: str, *, tie: bool, bias: bool = False) -> Any:
    """A tiny randomly initialised Llama/Qwen2/Qwen3 causal LM in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra: dict[str, Any] = {"tie_word_embeddings": tie, "rope_theta": 50000.0}
    if model_type == "llama":
        extra["attention_bias"] = bias
    if model_type == "qwen3":
        extra["head_dim"] = 32  # deliberately != hidden_size / num_heads (16), as in real Qwen3
    config = AutoConfig.for_model(model_type, **TINY_DIMS, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # norms and biases would otherwise be all ones/zeros
    return model.eval()


def hf_to_gguf_name(name: str) -> str:
    """The llama.cpp tensor name for an HF parameter name."""
    if name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    assert match is not None, name
    return f"blk.{match.group(1)}.{_HF_TO_GGUF_LAYER[match.group(2)]}.{match.group(3)}"


def permute_like_llama_cpp(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rows (what its converter does)."""
    # Per head, view rows as [2, head_dim/2] (the two halves) and interleave them.
    head_dim = weight.shape[0] // num_heads
    halves = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_raw_gguf(
    path: pathlib.Path,
    config: Any,
    tensors: dict[str, tuple[np.ndarray, Any]],
    extra_metadata: Callable[[Any], None] | None = None,
) -> pathlib.Path:
    """Write a GGUF with metadata from an HF `config` and {gguf name: (array, raw qtype)}."""
    import gguf

    writer = gguf.GGUFWriter(path, config.model_type)
    add_model_shape(writer, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if extra_metadata is not None:
        extra_metadata(writer)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf(
    path: pathlib.Path,
    model: Any,
    qtype: Any = None,
    extra_metadata: Callable[[Any], None] | None = None,
) -> pathlib.Path:
    """Write `model` as llama.cpp would: Q/K permuted for llama, 2-D tensors in `qtype`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType.F32 if qtype is None else qtype
    config = model.config
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        array = tensor.numpy()
        if config.model_type == "llama" and ".q_proj." in name:
            array = permute_like_llama_cpp(array, config.num_attention_heads)
        elif config.model_type == "llama" and ".k_proj." in name:
            array = permute_like_llama_cpp(array, config.num_key_value_heads)
        if array.ndim == 2:
            array = quantize(array, qtype)  # uint8 blocks, or float16/float32 arrays
        tensors[hf_to_gguf_name(name)] = (array, qtype if array.dtype == np.uint8 else None)
    return write_raw_gguf(path, config, tensors, extra_metadata)


@pytest.fixture
def tiny_model() -> Callable[..., Any]:
    """Factory fixture for make_tiny_model."""
    return make_tiny_model


@pytest.fixture
def gguf_file() -> Callable[..., pathlib.Path]:
    """Factory fixture for write_gguf."""
    return write_gguf


@pytest.fixture
def raw_gguf_file() -> Callable[..., pathlib.Path]:
    """Factory fixture for write_raw_gguf."""
    return write_raw_gguf


@pytest.fixture
def llama_cpp_permute() -> Callable[[np.ndarray, int], np.ndarray]:
    """The llama.cpp converter's Q/K row permutation."""
    return permute_like_llama_cpp
