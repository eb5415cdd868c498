"""Shared by the GPU benchmarks: random-weight checkpoints with real model shapes, and the CUDA check.

Random weights keep the runs free of downloads; the cost of a step depends on the shapes only
(greedy tokens of random weights are meaningless, and ignore_eos fixes every output length).
"""

from __future__ import annotations

import pathlib
import platform
import sys
from typing import Any

# HF config class and fields of each benchmarked shape (the published configs, weights random).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("LlamaConfig", {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True}),
    "qwen3-0.6b": ("Qwen3Config", {
        "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": True}),
}


def require_cuda() -> None:
    """Exit with a clear message (status 2) where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        print(f"{pathlib.Path(sys.argv[0]).name}: needs an NVIDIA GPU, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}); these benchmarks only run on CUDA", file=sys.stderr)
        raise SystemExit(2)


def save_random_model(shape: str, path: pathlib.Path, dtype: str = "bfloat16", seed: int = 0) -> dict[str, Any]:
    """Write a random-weight HF checkpoint of `shape` plus a word-level tokenizer; return its config fields."""
    import torch
    import transformers

    config_name, fields = SHAPES[shape]
    # Token 0 begins, 1 ends (ignored: every request sets ignore_eos), 2 pads (HF batches).
    config = getattr(transformers, config_name)(bos_token_id=0, eos_token_id=1, pad_token_id=2, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    save_tokenizer(fields["vocab_size"], path)
    return fields


def save_tokenizer(vocab_size: int, path: pathlib.Path) -> None:
    """A word-level tokenizer covering the whole vocabulary ("t0" .. "t{n-1}"), so any sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t0", eos_token="t1", pad_token="t2",
                            unk_token="t0").save_pretrained(path)


def weight_bytes(fields: dict[str, Any], bytes_per_param: int = 2) -> int:
    """Bytes of weights read per decode step: every matrix and norm once, the LM head included."""
    hidden, inter, layers = fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"]
    q = fields["num_attention_heads"] * fields["head_dim"]
    kv = fields["num_key_value_heads"] * fields["head_dim"]
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    # The LM head is read whole each step; an untied input embedding only one row per token (not counted).
    params = layers * per_layer + fields["vocab_size"] * hidden + hidden
    return params * bytes_per_param


def kv_bytes_per_token(fields: dict[str, Any], bytes_per_element: int = 2) -> int:
    """K and V bytes one token occupies across all layers."""
    return (2 * fields["num_hidden_layers"] * fields["num_key_value_heads"] * fields["head_dim"]
            * bytes_per_element)


def machine_info() -> dict[str, Any]:
    """GPU, driver-visible memory and library versions, for the JSON."""
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info
