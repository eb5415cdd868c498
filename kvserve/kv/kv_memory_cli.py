"""`kvserve kv-memory`: KV-cache bytes per token and totals for a model and its MHA/GQA/MQA/MLA equivalents."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvserve.kv.dtypes import MODEL_DTYPES, model_dtype_bytes
from kvserve.kv.kv_memory import BUILTIN_SHAPES, format_report, kv_memory_report, load_shape


def _positive_int(text: str) -> int:
    """argparse type: an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_kv_memory(args: argparse.Namespace) -> None:
    """Print the KV-cache memory table (or JSON with --json) for `args.model`."""
    shape = load_shape(args.model)
    report = kv_memory_report(shape, context=args.context, batch=args.batch,
                              model_dtype_bytes=model_dtype_bytes(args.model_dtype),
                              gqa_kv_heads=args.gqa_kv_heads)
    if args.json:
        payload: dict[str, Any] = report.to_dict()
        payload["model_dtype"] = args.model_dtype
        print(json.dumps(payload, indent=2))
    else:
        print(format_report(report, args.model_dtype))


def add_kv_memory_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the `kv-memory` subcommand on `subparsers` (its handler is in `func`)."""
    parser = subparsers.add_parser(
        "kv-memory", help="KV-cache memory per token and per context for a model and its MHA/GQA/MQA/MLA equivalents",
        description="KV elements per token per layer, bytes per token for each kv_cache_dtype (scales included) "
                    "and totals for --context tokens × --batch sequences.")
    parser.add_argument("--model", default=None, metavar="PATH_OR_NAME",
                        help=f"a .gguf file, an HF config.json or its directory, or a built-in shape "
                             f"({', '.join(BUILTIN_SHAPES)}); default: the bundled model")
    parser.add_argument("--context", type=_positive_int, default=4096, metavar="N", help="tokens per sequence")
    parser.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="number of sequences")
    parser.add_argument("--model-dtype", choices=list(MODEL_DTYPES), default="float16",
                        help="dtype that kv_cache_dtype=auto stores, named in its rows (the engine's CPU default "
                             "is float32, CUDA's 16-bit)")
    parser.add_argument("--gqa-kv-heads", type=_positive_int, default=None, metavar="N",
                        help="KV heads of the GQA equivalent (default: the model's, or 8 for MHA/MLA models)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    parser.set_defaults(func=cmd_kv_memory)
