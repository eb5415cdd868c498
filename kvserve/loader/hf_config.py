"""The HF config keys every ModelSource guarantees, and filling them in for config.json files."""

from __future__ import annotations

import pathlib
from collections.abc import Collection
from typing import Any

# Every ModelSource.hf_config has these keys (GGUF builds exactly these; HF dirs keep all of
# config.json and gain any of these it lacks).
HF_CONFIG_KEYS: tuple[str, ...] = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "attention_bias",
    "torch_dtype",
)

_REQUIRED = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "vocab_size",
)


def normalize_hf_config(
    raw: dict[str, Any], tensor_names: Collection[str], path: pathlib.Path
) -> dict[str, Any]:
    """Copy of config.json `raw` with HF_CONFIG_KEYS filled from defaults and the weights."""
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"{path}: config.json lacks required keys {missing}")
    config = dict(raw)
    num_heads = config["num_attention_heads"]
    config.setdefault("model_type", None)
    config.setdefault("num_key_value_heads", num_heads)
    if config.get("head_dim") is None:
        config["head_dim"] = config["hidden_size"] // num_heads
    config.setdefault("rms_norm_eps", 1e-6)
    _fill_rope(config)
    config.setdefault("bos_token_id", None)
    config.setdefault("eos_token_id", None)
    config.setdefault("torch_dtype", config.get("dtype"))
    # Qwen2 configs have no attention_bias key (its q/k/v always have biases): ask the weights.
    config.setdefault("attention_bias", "model.layers.0.self_attn.q_proj.bias" in tensor_names)
    has_head = "lm_head.weight" in tensor_names
    config.setdefault("tie_word_embeddings", not has_head)
    if not config["tie_word_embeddings"] and not has_head:
        raise ValueError(f"{path}: tie_word_embeddings is false but there is no lm_head.weight")
    return config


def _fill_rope(config: dict[str, Any]) -> None:
    """Set rope_theta/rope_scaling, reading transformers 5's `rope_parameters` if present."""
    # transformers >= 5 writes {"rope_parameters": {"rope_type", "rope_theta", ...}} instead
    # of the older top-level rope_theta + rope_scaling.
    parameters = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", parameters.get("rope_theta", 10000.0))
    if "rope_scaling" not in config:
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
        is_default = scaling.get("rope_type", "default") == "default"
        config["rope_scaling"] = None if is_default else scaling
    scaling = config["rope_scaling"]
    if isinstance(scaling, dict) and "rope_type" not in scaling and "type" in scaling:
        # Older configs spell it "type"; give consumers one key to read.
        config["rope_scaling"] = {**scaling, "rope_type": scaling["type"]}
