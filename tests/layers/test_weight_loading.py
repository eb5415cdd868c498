"""The one weight path: packed shards, completeness, and ValueErrors naming the tensor (both models)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvserve.attention.backend import AttentionRequirements
from kvserve.attention.torch_backend import TorchAttentionBackend
from kvserve.config import ModelConfig
from kvserve.models.registry import build_model

LLAMA: dict[str, Any] = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 96, "hidden_size": 64,
                         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "tie_word_embeddings": False}
DEEPSEEK: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 96, "hidden_size": 64,
                            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 24,
                            "q_lora_rank": None, "n_routed_experts": 4, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                            "tie_word_embeddings": True}


def _model(hf: dict[str, Any], **changes: Any) -> torch.nn.Module:
    config = ModelConfig.from_hf_config({**hf, **changes})
    backend = TorchAttentionBackend(AttentionRequirements(torch.device("cpu"), "float32", use_window=False,
                                                          use_mla=config.architecture.startswith("Deepseek")))
    return build_model(config, 64, backend)


def _llama_checkpoint(tie: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face-named random tensors for the tiny Qwen2 (q/k/v with biases, gate/up unfused)."""
    hidden, inter, q, kv = 64, 128, 64, 32
    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(96, hidden), "model.norm.weight": torch.randn(hidden)}
    if not tie:
        tensors["lm_head.weight"] = torch.randn(96, hidden)
    for i in range(2):
        layer = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
                  "self_attn.v_proj.weight": (kv, hidden), "self_attn.q_proj.bias": (q,),
                  "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
                  "self_attn.o_proj.weight": (hidden, q), "mlp.gate_proj.weight": (inter, hidden),
                  "mlp.up_proj.weight": (inter, hidden), "mlp.down_proj.weight": (hidden, inter),
                  "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
        tensors |= {layer + name: torch.randn(shape) for name, shape in shapes.items()}
    return tensors


def test_packed_shards_land_in_output_order() -> None:
    checkpoint = _llama_checkpoint()
    model = _model(LLAMA)
    model.load_weights(checkpoint.items())
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    prefix = "model.layers.1."
    expected_qkv = torch.cat([checkpoint[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(attn.qkv_proj.bias, torch.cat([checkpoint[prefix + f"self_attn.{p}_proj.bias"] for p in "qkv"]))
    expected_gate_up = torch.cat([checkpoint[prefix + f"mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(mlp.gate_up_proj.weight, expected_gate_up)
    assert torch.equal(model.lm_head.weight, checkpoint["lm_head.weight"])


def test_tied_lm_head_is_the_embedding() -> None:
    checkpoint = _llama_checkpoint(tie=True)
    model = _model(LLAMA, tie_word_embeddings=True)
    model.load_weights(checkpoint.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, checkpoint["model.embed_tokens.weight"])


def test_a_missing_shard_is_named() -> None:
    checkpoint = _llama_checkpoint()
    del checkpoint["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"checkpoint lacks 1 tensor\(s\) Qwen2ForCausalLM needs, "
                                         r"e.g. \['model.layers.0.self_attn.qkv_proj.weight \(shard 1\)'\]"):
        _model(LLAMA).load_weights(checkpoint.items())


def test_an_unexpected_tensor_is_named() -> None:
    checkpoint = _llama_checkpoint() | {"model.layers.0.mlp.extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.0.mlp.extra.weight': no parameter"):
        _model(LLAMA).load_weights(checkpoint.items())


def test_a_shape_mismatch_is_named() -> None:
    checkpoint = _llama_checkpoint()
    checkpoint["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(33, 64)
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.1.self_attn.v_proj.weight': "
                                         r"has shape \(33, 64\), expected \(32, 64\)"):
        _model(LLAMA).load_weights(checkpoint.items())


def test_a_tensor_loaded_twice_is_named() -> None:
    checkpoint = list(_llama_checkpoint().items())
    checkpoint.append(("model.norm.weight", torch.zeros(64)))
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.norm.weight': loads 'model.norm.weight' a "
                                         r"second time"):
        _model(LLAMA).load_weights(checkpoint)


def test_rotary_buffers_are_skipped() -> None:
    checkpoint = _llama_checkpoint() | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}
    _model(LLAMA).load_weights(checkpoint.items())


def _deepseek_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our DeepSeek's parameters under Hugging Face names: gate/up unfused, the MoE experts stacked 3-D as
    transformers stores them, plus a multi-token-prediction layer past num_hidden_layers."""
    checkpoint: dict[str, torch.Tensor] = {}
    stacked: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        tensor = torch.randn(param.shape)
        if ".experts." in name:  # model.layers.1.mlp.experts.3.gate_up_proj.weight
            prefix, rest = name.split(".experts.")
            kind = rest.split(".")[1]
            stacked.setdefault(f"{prefix}.experts.{kind}", []).append(tensor)
        elif "gate_up_proj" in name:
            gate, up = tensor.chunk(2)
            checkpoint[name.replace("gate_up_proj", "gate_proj")] = gate
            checkpoint[name.replace("gate_up_proj", "up_proj")] = up
        else:
            checkpoint[name] = tensor
    checkpoint |= {name: torch.stack(tensors) for name, tensors in stacked.items()}
    checkpoint["model.layers.2.self_attn.kv_a_layernorm.weight"] = torch.zeros(3)  # MTP: skipped
    return checkpoint


def test_deepseek_loads_through_the_same_path() -> None:
    model = _model(DEEPSEEK)
    checkpoint = _deepseek_checkpoint(model)
    model.load_weights(checkpoint.items())
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts[2].gate_up_proj.weight, checkpoint["model.layers.1.mlp.experts.gate_up_proj"][2])
    assert torch.equal(model.lm_head.weight, checkpoint["model.embed_tokens.weight"])  # tied
    assert model.model.layers[0].self_attn.w_uk is not None  # processed after loading


def test_deepseek_errors_match_llamas() -> None:
    model = _model(DEEPSEEK)
    checkpoint = _deepseek_checkpoint(model)
    del checkpoint["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"checkpoint lacks 1 tensor\(s\) DeepseekV3ForCausalLM needs, "
                                         r"e.g. \['model.layers.0.mlp.gate_up_proj.weight \(shard 1\)'\]"):
        model.load_weights(checkpoint.items())
    checkpoint = _deepseek_checkpoint(model)
    checkpoint["model.layers.1.mlp.experts.down_proj"] = torch.zeros(3, 64, 32)
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.1.mlp.experts.down_proj': has 3 experts, "
                                         r"the config says 4"):
        _model(DEEPSEEK).load_weights(checkpoint.items())
