"""`kvserve quantize --method awq|int4|int8 --model DIR --out DIR`: write a quantized checkpoint kvserve reads.

- awq: AWQ scales searched on calibration text (awq_search.py), folded into the float weights, then int4
  round-to-nearest, written in AutoAWQ's GEMM format;
- int4: the same format without the search (plain round-to-nearest);
- int8: per-output-channel int8 in kvserve's own format (checkpoint_config.py).
The model is any Llama-family checkpoint kvserve opens (an HF directory or a .gguf file; nothing for the bundled
SmolLM2). Calibration text: the `--calibration-text` file's lines from `--calibration-start` on (default 0.5: for
WikiText-2's test split, its second half; benchmarks/bench_quant.py evaluates on the first half).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import torch

from kvserve.config import ModelConfig
from kvserve.kv.dtypes import MODEL_DTYPES, torch_dtype
from kvserve.layers.quantization.checkpoint_config import checkpoint_quantization
from kvserve.layers.quantization.rtn import check_group_size, default_group_size
from kvserve.llm import LLM
from kvserve.loader.weights import ModelSource, open_model
from kvserve.models.llama import LlamaForCausalLM
from kvserve.models.registry import model_class
from kvserve.quantize.awq_search import folded_scales, llama_scaling_groups, search_scale
from kvserve.quantize.calibration import CALIBRATION_START, calibration_sequences, collect_inputs
from kvserve.quantize.checkpoint_writer import output_config, quantized_tensors, write_checkpoint

METHODS = ("awq", "int4", "int8")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """What `kvserve quantize` does; the flags mirror these fields."""

    method: str
    model: str | None
    out: str
    group_size: int | None = None  # awq / int4; default: the largest of 128, 64, 32 dividing every input size
    dtype: str = "float32"  # of the tensors left in float
    calibration_text: str | None = None  # awq
    calibration_start: float = CALIBRATION_START
    calibration_tokens: int = 4096
    calibration_seq_len: int = 512
    search_rows: int = 512  # calibration rows per layer group for the output error
    alpha_grid: int = 20
    num_threads: int | None = None


def quantize(options: QuantizeOptions) -> dict[str, Any]:
    """Write the quantized checkpoint; returns a summary (method, group size, AWQ's alphas and errors)."""
    start = time.perf_counter()
    out = pathlib.Path(options.out)
    if (out / "config.json").exists():
        raise ValueError(f"--out {out} already holds a checkpoint (config.json); choose an empty directory")
    if options.method not in METHODS:
        raise ValueError(f"--method must be one of {list(METHODS)}, got {options.method!r}")
    if options.dtype not in MODEL_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(MODEL_DTYPES)}, got {options.dtype!r}")
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    source = open_model(options.model)
    config = _checked_model_config(source)
    group_size = _group_size(config, options.group_size)
    summary: dict[str, Any] = {"method": options.method, "model": str(source.path), "out": str(out)}
    if options.method != "int8":
        summary["group_size"] = group_size
    column_scales: dict[str, torch.Tensor] = {}
    divisors: dict[str, torch.Tensor] = {}
    if options.method == "awq":
        scales, summary["awq"] = _search_awq_scales(options, config, group_size)
        column_scales, divisors = folded_scales(llama_scaling_groups(config), scales)
    tensors = dict(quantized_tensors(source, options.method, group_size, torch_dtype(options.dtype), column_scales,
                                     divisors))
    write_checkpoint(out, tensors, output_config(source, options.method, group_size, options.dtype), source)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def _checked_model_config(source: ModelSource) -> ModelConfig:
    """The source's architecture, which must be a dense Llama-family one."""
    if checkpoint_quantization(source.hf_config, source.path) is not None:
        raise ValueError(f"{source.path} is quantized already; quantize a float checkpoint")
    config = ModelConfig.from_hf_config(source.hf_config)
    if model_class(config) is not LlamaForCausalLM:
        raise ValueError(f"kvserve quantize handles Llama-family models (Llama, Mistral, Qwen2, Qwen3), not "
                         f"{config.architecture}")
    return config


def _group_size(config: ModelConfig, requested: int | None) -> int:
    """`requested` if it fits every linear layer's input size, else the largest default that does."""
    common = math.gcd(config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size)
    if requested is None:
        return default_group_size(common)
    check_group_size(common, requested)
    return requested


def _search_awq_scales(options: QuantizeOptions, config: ModelConfig,
                       group_size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run the float model over the calibration text and search each layer group's scale; returns the scales
    by module and the search's figures."""
    if options.calibration_text is None:
        raise ValueError("--method awq needs --calibration-text FILE (plain text; e.g. WikiText-2)")
    llm = LLM(model=options.model, quantization="none", dtype="float32", show_progress=False,
              num_threads=options.num_threads, max_model_len=options.calibration_seq_len + 1)
    scales, alphas, ratios = {}, [], []
    try:
        sequences = calibration_sequences(llm, pathlib.Path(options.calibration_text), options.calibration_start,
                                          options.calibration_tokens, options.calibration_seq_len)
        model = llm.engine.runner.model
        groups = llama_scaling_groups(config)
        inputs = collect_inputs(llm, {g.module: model.get_submodule(g.module) for g in groups}, sequences,
                                options.search_rows)
        for group in groups:
            seen = inputs[group.module]
            result = search_scale(seen.sample_rows(), model.get_submodule(group.module).weight.detach(),
                                  seen.mean_abs(), group, group_size, options.alpha_grid)
            scales[group.module] = result.scale
            alphas.append(result.alpha)
            ratios.append(result.error / result.rtn_error if result.rtn_error > 0 else 1.0)
    finally:
        llm.engine.shutdown()
    figures = {"calibration_tokens": options.calibration_tokens, "calibration_text": options.calibration_text,
               "calibration_start": options.calibration_start, "search_rows": options.search_rows,
               "layer_groups": len(alphas), "mean_alpha": round(sum(alphas) / len(alphas), 3),
               "mean_output_mse_vs_rtn": round(sum(ratios) / len(ratios), 4)}
    return scales, figures


def cmd_quantize(args: argparse.Namespace) -> None:
    """The subcommand: quantize and print the summary as JSON."""
    options = QuantizeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(QuantizeOptions)})
    print(json.dumps(quantize(options), indent=2))


def add_quantize_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `quantize` on `subparsers`."""
    parser = subparsers.add_parser("quantize", help="write an AWQ / int4 (AutoAWQ GEMM format) or int8 checkpoint",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = QuantizeOptions(method="awq", model=None, out="")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--model", default=None, help="an HF directory or .gguf file (default: the bundled SmolLM2)")
    parser.add_argument("--out", required=True, help="the directory to write (must not hold a checkpoint)")
    parser.add_argument("--group-size", type=int, default=None, help="int4 / awq: inputs per scale and zero point "
                        "(default: the largest of 128, 64, 32 that divides every layer's input size)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(MODEL_DTYPES),
                        help="dtype of the tensors left in float (embeddings, LM head, norms)")
    parser.add_argument("--calibration-text", default=None, help="awq: a plain-text file to calibrate on")
    parser.add_argument("--calibration-start", type=float, default=defaults.calibration_start,
                        help="awq: calibrate on the file's lines from this fraction on")
    parser.add_argument("--calibration-tokens", type=int, default=defaults.calibration_tokens)
    parser.add_argument("--calibration-seq-len", type=int, default=defaults.calibration_seq_len)
    parser.add_argument("--search-rows", type=int, default=defaults.search_rows,
                        help="awq: calibration rows per layer group on which the output error is measured")
    parser.add_argument("--alpha-grid", type=int, default=defaults.alpha_grid, help="awq: alphas 0, 1/n, ...")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.set_defaults(func=cmd_quantize)
