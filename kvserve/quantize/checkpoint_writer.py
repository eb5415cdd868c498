"""Write a quantized Hugging Face checkpoint: the source's tensors with AWQ's scales folded in, each linear
weight of the decoder layers quantized, everything else (embeddings, LM head, norms) in float.

- awq / int4: AutoAWQ GEMM tensors per linear layer (`qweight`, `qzeros`, `scales`; awq_format.py) and
  config.json's quantization_config {quant_method: awq, bits: 4, group_size, zero_point: true, version: gemm}.
- int8: `weight` int8 and `weight_scale` float32 per linear layer, quant_method "kvserve-int8"
  (checkpoint_config.py): the int8 method's own layout, so kvserve loads it by copy.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import save_file

from kvserve.layers.quantization.awq_format import awq_quantization_config, to_awq
from kvserve.layers.quantization.checkpoint_config import int8_quantization_config
from kvserve.layers.quantization.rtn import quantize_int4_groups, quantize_int8_rows
from kvserve.loader.weights import ModelSource

# The linear weights of a Llama-family decoder layer, in Hugging Face names.
LINEAR_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
WEIGHTS_FILE = "model.safetensors"


def is_linear_weight(name: str) -> bool:
    """Whether `name` is a decoder layer's linear weight (quantized; the LM head and embeddings are not)."""
    return LINEAR_WEIGHT.fullmatch(name) is not None


def fold_scales(name: str, tensor: torch.Tensor, column_scales: dict[str, torch.Tensor],
                divisors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor with AWQ's scales applied: a consumer weight's columns times s, a producer's dim 0 divided by
    its s (a norm's values, v_proj's / up_proj's rows and bias). The float model computes the same function."""
    if name in column_scales:
        tensor = tensor * column_scales[name]  # [out, in] * [in]
    if name in divisors:
        tensor = tensor / divisors[name].view(-1, *[1] * (tensor.dim() - 1))  # [rows, ...] / [rows]
    return tensor


def quantized_tensors(source: ModelSource, method: str, group_size: int, dtype: torch.dtype,
                      column_scales: dict[str, torch.Tensor] | None = None,
                      divisors: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the output checkpoint, from the source's float32 tensors: scales folded, linear
    weights quantized by `method` (awq / int4: AWQ tensors; int8), the rest in `dtype`."""
    for name, tensor in source.iter_weights(torch.float32):
        tensor = fold_scales(name, tensor, column_scales or {}, divisors or {})
        if not is_linear_weight(name):
            yield name, tensor.to(dtype).contiguous()
        elif method == "int8":
            q, scale = quantize_int8_rows(tensor)
            yield name, q
            yield name + "_scale", scale
        else:
            prefix = name.removesuffix(".weight")
            for key, value in to_awq(quantize_int4_groups(tensor, group_size, scale_dtype=torch.float16)).items():
                yield f"{prefix}.{key}", value


def output_config(source: ModelSource, method: str, group_size: int, dtype_name: str) -> dict[str, Any]:
    """The source's config.json (an HF directory's own file, a GGUF's translated keys) with the quantization."""
    own = pathlib.Path(source.path) / "config.json"
    config = json.loads(own.read_text(encoding="utf-8")) if own.is_file() else dict(source.hf_config)
    config["torch_dtype"] = dtype_name
    config["quantization_config"] = (int8_quantization_config() if method == "int8"
                                     else awq_quantization_config(group_size))
    return config


def write_checkpoint(out: pathlib.Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                     source: ModelSource) -> None:
    """config.json, one model.safetensors and the source's tokenizer (and generation_config.json) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    source.load_tokenizer().save_pretrained(out)
    generation = pathlib.Path(source.path) / "generation_config.json"
    if generation.is_file():
        (out / generation.name).write_bytes(generation.read_bytes())
