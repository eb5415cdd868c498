"""llama.cpp's `deepseek2` GGUF (DeepSeek-V2, V2-Lite, V3) back into Hugging Face names, config and tensors.

What llama.cpp's converter changed, undone here:
- `num_key_value_heads` is written as 1 and the key / value lengths as the absorbed MLA's (kv_lora_rank + rope,
  kv_lora_rank); the per-head sizes are in `attention.key_length_mla` / `value_length_mla` (older files: in
  key_length / value_length, with no _mla keys);
- kv_b_proj [H * (d_n + d_v), d_c] is stored as `attn_k_b` [H, d_c, d_n] (transposed) and `attn_v_b`
  [H, d_v, d_c] (older files keep `attn_kv_b` whole);
- the routed experts are stacked per layer, [E, out, in] (`ffn_{gate,up,down}_exps`);
- V3's e_score_correction_bias is `exp_probs_b.bias`; sigmoid scoring is `expert_gating_func` 2.
The routing knobs the file does not keep take the converter's and llama.cpp's defaults: groups only when
`expert_group_count` is written, mscale = mscale_all_dim = yarn_log_multiplier / 0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

LAYER_NAMES: dict[str, str] = {
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",  # joined with v_b into kv_b_proj
    "attn_v_b": "self_attn.v_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    "exp_probs_b": "mlp.gate.e_score_correction",
}

_SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def hf_config(arch: Callable[..., Any], num_heads: int) -> dict[str, Any]:
    """The DeepSeek keys of an HF config, from `{arch}.*` metadata (`arch(suffix, default=...)`)."""
    rope = int(arch("rope.dimension_count", required=True))
    key_length = int(arch("attention.key_length_mla", default=None) or arch("attention.key_length", required=True))
    value_length = int(arch("attention.value_length_mla", default=None) or arch("attention.value_length",
                                                                                 required=True))
    sigmoid = int(arch("expert_gating_func", default=1)) == _SIGMOID_GATING
    num_groups = int(arch("expert_group_count", default=1))
    config: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "num_key_value_heads": num_heads,
        "kv_lora_rank": int(arch("attention.kv_lora_rank", required=True)),
        "q_lora_rank": arch("attention.q_lora_rank", default=None),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": key_length - rope,
        "v_head_dim": value_length,
        "n_routed_experts": int(arch("expert_count", default=0)),
        "num_experts_per_tok": int(arch("expert_used_count", default=0)),
        "n_shared_experts": int(arch("expert_shared_count", default=0)),
        "moe_intermediate_size": int(arch("expert_feed_forward_length", default=0)),
        "first_k_dense_replace": int(arch("leading_dense_block_count", default=0)),
        "routed_scaling_factor": float(arch("expert_weights_scale", default=1.0)),
        "norm_topk_prob": bool(arch("expert_weights_norm", default=False)),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if num_groups > 1 else "greedy"),
        "n_group": num_groups,
        "topk_group": int(arch("expert_group_used_count", default=1)),
        "rope_interleave": True,
        "hidden_act": "silu",
    }
    log_multiplier = arch("rope.scaling.yarn_log_multiplier", default=None)
    if log_multiplier is not None:
        config["mscale_all_dim"] = float(log_multiplier) / 0.1
    return config


def yarn_mscale(config: dict[str, Any]) -> None:
    """The converter keeps only mscale_all_dim: put it in rope_scaling as both mscales (as llama.cpp reads it)."""
    scaling, mscale = config.get("rope_scaling"), config.pop("mscale_all_dim", None)
    if isinstance(scaling, dict) and mscale is not None:
        scaling.update(mscale=mscale, mscale_all_dim=mscale)


def weights(named: Iterator[tuple[str, Any]], dequantize: Callable[[str, Any], np.ndarray]
            ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor: k_b and v_b joined into kv_b_proj, stacked experts split."""
    halves: dict[str, dict[str, np.ndarray]] = {}  # layer prefix -> {"k": k_b, "v": v_b} until both are read
    for name, tensor in named:
        array = dequantize(name, tensor)
        if name.endswith((".k_b_proj.weight", ".v_b_proj.weight")):
            prefix, _, kind = name.rpartition(".self_attn.")
            pair = halves.setdefault(prefix, {})
            pair[kind[0]] = array
            if len(pair) == 2:
                del halves[prefix]
                yield f"{prefix}.self_attn.kv_b_proj.weight", _join_kv_b(pair["k"], pair["v"])
        elif ".mlp.experts." in name and array.ndim == 3:
            head, _, tail = name.partition(".mlp.experts.")
            for expert, rows in enumerate(array):  # [E, out, in] -> E tensors [out, in]
                yield f"{head}.mlp.experts.{expert}.{tail}", rows
        elif name.endswith(".e_score_correction.bias"):
            yield name.replace(".e_score_correction.bias", ".e_score_correction_bias"), array
        else:
            yield name, array
    if halves:
        raise ValueError(f"attn_k_b without attn_v_b (or the reverse) in {sorted(halves)}")


def _join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """k_b [H, d_c, d_n], v_b [H, d_v, d_c] -> kv_b_proj [H * (d_n + d_v), d_c]."""
    rank = k_b.shape[1]
    return np.ascontiguousarray(np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, rank))
