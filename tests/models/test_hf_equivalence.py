"""Tiny random-weight models against Hugging Face transformers: exact greedy tokens.

Covers MHA, GQA and MQA (Llama), Mistral's sliding window, Phi-3's fused checkpoint tensors (and its window),
Qwen2-style QKV bias and Qwen3-style QK-norm, and Qwen2-MoE / Qwen3-MoE (the MoE code DeepSeek shares).
"""

import pytest
import torch
import transformers

from kvserve import LLM, SamplingParams

NUM_NEW_TOKENS = 32
PROMPTS = [[1, 520, 3000, 45, 8800, 17, 99, 250], [5, 42], list(range(300, 341))]

CASES = {
    "llama-mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama-gqa": ("LlamaConfig", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "llama-mqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 1}),
    "llama3-rope": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                  "sliding_window": None}),
    "mistral-window": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 12}),
    "phi3": ("Phi3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None,
                            "pad_token_id": 0}),
    "phi3-window": ("Phi3Config", {"num_attention_heads": 4, "num_key_value_heads": 4, "sliding_window": 10,
                                   "pad_token_id": 0}),
    "qwen2-bias": ("Qwen2Config", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen3-qknorm": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                     "head_dim": 32, "rope_theta": 500000.0}),
    # MoE: 8 experts, top-2; Qwen2-MoE with a gated shared expert and its dense layer 1, Qwen3-MoE normalised
    "qwen2-moe": ("Qwen2MoeConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 96, "mlp_only_layers": [1]}),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                                     "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "norm_topk_prob": True}),
}


def make_hf_model(config_name: str, overrides: dict, vocab_size: int):
    settings = {"rope_theta": 10000.0, **overrides}
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        max_position_embeddings=512, tie_word_embeddings=False,
        # Larger weights than the usual 0.02 give peaked logits: no near-ties for greedy to flip.
        initializer_range=0.15, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config_name in ("Qwen2Config", "Qwen2MoeConfig"):  # random biases: a bias bug cannot hide at zero
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_matches_transformers(case, tmp_path, tokenizer):
    config_name, overrides = CASES[case]
    hf_model = make_hf_model(config_name, overrides, len(tokenizer))
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    llm = LLM(model=str(tmp_path), kv_cache_memory=8 * 2**20, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=1)
    ours = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS,
                                         do_sample=False, eos_token_id=None,
                                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        tokens = output.outputs[0].token_ids
        assert tokens == expected[0, len(prompt):].tolist()
        # Tiny random models often repeat a token whatever attention sees; the log-probabilities do not.
        logprobs = [step[token] for step, token in zip(output.outputs[0].logprobs, tokens, strict=True)]
        torch.testing.assert_close(torch.tensor(logprobs), reference_logprobs(hf_model, prompt, tokens),
                                   atol=1e-4, rtol=0)


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Each generated token's log-probability under one forward over prompt + tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


BASE_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128}


@pytest.mark.parametrize(("architecture", "extra", "message"), [
    ("Phi3ForCausalLM", {"partial_rotary_factor": 0.5},
     r"Phi3ForCausalLM with partial_rotary_factor=0.5 is not supported \(only 1.0\)"),
    ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                             "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for Qwen2MoeForCausalLM"),
])
def test_settings_a_model_cannot_run_are_refused(architecture, extra, message):
    from kvserve.attention.backend import AttentionRequirements
    from kvserve.attention.torch_backend import TorchAttentionBackend
    from kvserve.config import ModelConfig
    from kvserve.models.registry import build_model

    config = ModelConfig.from_hf_config({"architectures": [architecture], **BASE_CONFIG, **extra})
    backend = TorchAttentionBackend(AttentionRequirements(torch.device("cpu"), "float32", False, False))
    with pytest.raises(ValueError, match=message):
        build_model(config, 128, backend)


def test_sinks_and_window_are_refused_beside_a_models_own_window(tmp_path, tokenizer):
    config_name, overrides = CASES["mistral-window"]
    make_hf_model(config_name, overrides, len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kv_window is not supported for MistralForCausalLM: its layers have their "
                                         "own sliding window"):
        LLM(model=str(tmp_path), kv_cache_memory=8 * 2**20, kv_window=32, show_progress=False)
