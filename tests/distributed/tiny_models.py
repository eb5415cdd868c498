"""Tiny random models of every attention kind, saved once per session for the distributed tests."""

from __future__ import annotations

from typing import Any

import torch
import transformers

PROMPTS = [[1, 520, 3000, 45, 8800, 17, 99, 250], [5, 42], list(range(300, 341))]
MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64}

# name -> (transformers config class, its settings); hidden 128, 3 layers unless set.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama-gqa": ("LlamaConfig", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    # One KV head, replicated on both ranks, which split its query heads.
    "llama-mqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 1}),
    # Three KV heads over two ranks: 2 + 1 (the bundled model's split), with QK-norm.
    "qwen3-uneven": ("Qwen3Config", {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 32}),
    # Experts sliced on every rank (one all-reduce per MoE block), a gated shared expert, QKV biases.
    "qwen2-moe": ("Qwen2MoeConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, **MOE,
                                     "shared_expert_intermediate_size": 96, "mlp_only_layers": [1]}),
    # MLA: heads split, the latent projections and the latent cache on every rank; routed and shared experts.
    "deepseek-v3-mla": ("DeepseekV3Config", {"num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 64,
                                             "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                             "qk_rope_head_dim": 8, "v_head_dim": 24, "n_routed_experts": 8,
                                             "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                             "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1,
                                             "topk_group": 1, "num_hidden_layers": 2}),
    # Sliding-window and global layers (a hybrid KV cache), one KV head.
    "gemma3-sliding": ("Gemma3TextConfig", {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
                                            "sliding_window": 16, "query_pre_attn_scalar": 24,
                                            "num_hidden_layers": 6}),
}


def save_model(name: str, path, vocab_size: int, tokenizer: Any) -> None:
    config_name, settings = CASES[name]
    settings = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, **settings}
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=False,
        # Larger weights than the usual 0.02 give peaked logits: no near-ties for greedy to flip.
        initializer_range=0.15, **settings)
    if config_name == "Gemma3TextConfig":
        config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


