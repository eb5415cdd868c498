"""Gemma 2 from llama.cpp's `gemma2` GGUF: a tiny random transformers model written the way llama.cpp's converter
lays it out (norms stored as 1 + w, the soft caps and the window in metadata), then run by the engine against
transformers on the same weights, past its window."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_writing import add_model_shape, copy_bundled_tokenizer, finish, transformers_greedy

from kvserve import LLM, SamplingParams

NUM_NEW_TOKENS = 24
WINDOW = 16
PROMPTS = [[1, 520, 3000, 45, 8800, 17, 99, 250], list(range(300, 341)), list(range(1000, 1097))]
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
         "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def write_gemma2_gguf(model: transformers.PreTrainedModel, path) -> None:
    """The model as llama.cpp's converter writes it (float32 tensors), with the bundled model's tokenizer."""
    config = model.config
    writer = gguf.GGUFWriter(path, "gemma2")
    add_model_shape(writer, config)
    writer.add_value_length(config.head_dim)
    writer.add_sliding_window(config.sliding_window)
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    copy_bundled_tokenizer(writer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: the embedding is the head
            continue
        array = tensor.float().numpy()
        if name.endswith("norm.weight"):
            array = array + 1  # the converter stores the norms' full scale
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, index, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            gguf_name = f"blk.{index}.{LAYER[module]}.{kind}"
        writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    finish(writer)


@pytest.fixture(scope="module")
def gemma2_gguf(tmp_path_factory, tokenizer):
    config = transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,  # llama.cpp: head_dim
        sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        max_position_embeddings=512, initializer_range=0.15)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights: the stored 1 + w cannot hide at zero
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("gemma2") / "tiny-gemma2.gguf"
    write_gemma2_gguf(model, path)
    return path, model


def test_gemma2_gguf_matches_transformers(gemma2_gguf):
    path, model = gemma2_gguf
    llm = LLM(model=str(path), kv_cache_memory=8 * 2**20, max_num_batched_tokens=16, block_size=4,
              show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == transformers_greedy(model, prompt, NUM_NEW_TOKENS)
