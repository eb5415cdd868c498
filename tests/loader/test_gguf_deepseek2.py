"""DeepSeek-V2 / V3 from llama.cpp's `deepseek2` GGUF: a tiny random transformers model written the way llama.cpp's
converter lays it out (MQA-style key lengths, kv_b_proj split into a transposed k_b and v_b, stacked experts, V3's
bias as exp_probs_b), then run by the engine against transformers on the same weights."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_writing import copy_bundled_tokenizer, finish, transformers_greedy

from kvserve import LLM, SamplingParams

NUM_NEW_TOKENS = 24
PROMPTS = [[1, 520, 3000, 45, 8800, 17, 99, 250], [5, 42], list(range(300, 341))]
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
         "v_head_dim": 24, "max_position_embeddings": 256, "tie_word_embeddings": False, "initializer_range": 0.15,
         "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1}
CASES = {
    # V2 with query LoRA and two shared experts; softmax, greedy top-k.
    "v2-lora": ("DeepseekV2Config", {"q_lora_rank": 48, "n_shared_experts": 2, "topk_method": "greedy",
                                     "routed_scaling_factor": 1.5}),
    # V3-style: no query LoRA, sigmoid scoring with a correction bias, normalised top-k.
    "v3-sigmoid": ("DeepseekV3Config", {"q_lora_rank": None, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
                                        "norm_topk_prob": True, "routed_scaling_factor": 2.5}),
}
# HF -> llama.cpp names inside a layer (the rest: kv_b_proj, experts and the bias are reshaped first).
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
         "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
         "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
         "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
         "mlp.shared_experts.down_proj": "ffn_down_shexp"}


def write_deepseek2_gguf(model: transformers.PreTrainedModel, path: pathlib.Path) -> None:
    """The model as llama.cpp's converter writes it (float32 tensors), with the bundled model's tokenizer."""
    config = model.config
    writer = gguf.GGUFWriter(path, "deepseek2")
    heads, nope, rope, v_dim, rank = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                                      config.v_head_dim, config.kv_lora_rank)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)  # the converter's MQA view of MLA
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    if config.q_lora_rank:
        writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(rank)
    writer.add_key_length(rank + rope)
    writer.add_value_length(rank)
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(v_dim)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_weights_norm(bool(config.norm_topk_prob))
    sigmoid = config.model_type == "deepseek_v3"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_rope_dimension_count(rope)
    copy_bundled_tokenizer(writer)
    for name, tensor in model.state_dict().items():
        for gguf_name, array in _converted(name, tensor.float().numpy(), heads, nope, v_dim):
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    finish(writer)


def _converted(name: str, array: np.ndarray, heads: int, nope: int, v_dim: int):
    """llama.cpp's (name, array) pairs for one transformers tensor."""
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if name in globals_:
        return [(globals_[name], array)]
    _, _, index, rest = name.split(".", 3)
    block = f"blk.{index}"
    if rest == "self_attn.kv_b_proj.weight":  # [H * (d_n + d_v), d_c] -> k_b [H, d_c, d_n], v_b [H, d_v, d_c]
        kv_b = array.reshape(heads, nope + v_dim, -1)
        return [(f"{block}.attn_k_b.weight", kv_b[:, :nope].transpose(0, 2, 1)),
                (f"{block}.attn_v_b.weight", kv_b[:, nope:])]
    if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H] -> gate, up [E, I, H]
        gate, up = np.split(array, 2, axis=1)
        return [(f"{block}.ffn_gate_exps.weight", gate), (f"{block}.ffn_up_exps.weight", up)]
    if rest == "mlp.experts.down_proj":
        return [(f"{block}.ffn_down_exps.weight", array)]
    if rest == "mlp.gate.e_score_correction_bias":
        return [(f"{block}.exp_probs_b.bias", array)]
    module, _, kind = rest.rpartition(".")
    return [(f"{block}.{LAYER[module]}.{kind}", array)]


@pytest.fixture(scope="module", params=list(CASES))
def deepseek2_gguf(request, tmp_path_factory, tokenizer):
    config_name, overrides = CASES[request.param]
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), **SHAPE, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # V3's correction bias starts at zero: make it matter
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp(request.param) / "tiny-deepseek2.gguf"
    write_deepseek2_gguf(model, path)
    return path, model


def test_deepseek2_gguf_matches_transformers(deepseek2_gguf):
    path, model = deepseek2_gguf
    llm = LLM(model=str(path), kv_cache_memory=8 * 2**20, max_num_batched_tokens=16, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == transformers_greedy(model, prompt, NUM_NEW_TOKENS)


def test_deepseek2_gguf_refuses_block_formats(deepseek2_gguf):
    path, _ = deepseek2_gguf
    with pytest.raises(ValueError, match="deepseek2 GGUF files run dequantized"):
        LLM(model=str(path), quantization="gguf", kv_cache_memory=8 * 2**20, show_progress=False)


def test_a_k_b_without_its_v_b_is_refused():
    from kvserve.loader.gguf_deepseek2 import weights

    half = [("model.layers.0.self_attn.k_b_proj.weight", np.zeros((4, 32, 16), dtype=np.float32))]
    with pytest.raises(ValueError, match=r"attn_k_b without attn_v_b \(or the reverse\) in \['model.layers.0'\]"):
        list(weights(iter(half), lambda name, array: array))
