"""Weight quantization on the bundled SmolLM2-135M: WikiText-2 perplexity of each weight format, same tokens.

Rows (float32 activations but in gguf_q4_1_int8_activations; float32 KV cache):
- float32: the bundled GGUF converted by transformers to a float32 Hugging Face directory (made once, cached in
  `--cache-dir`, by default ~/.cache/kvserve/bench_quant; never in the repository, never downloaded);
- gguf_q4_1: the bundled .gguf on its own Q4_1/Q8_0 blocks (kvserve's default: float32 activations);
- gguf_q4_1_int8_activations: the same with `cpu_gguf_int8_activations` (llama.cpp's arithmetic: activations
  rounded to 8 bits per 32 values, on the interleaved Q4_1 / Q8_0 tiles at every chunk length): its price;
- gguf_q4_1_dequantized: the same file with quantization="none": the same model up to float rounding;
- int8: the float32 directory quantized at load (per output channel);
- int4_rtn: the float32 directory quantized at load, round-to-nearest, `--group-size` inputs per group;
- awq_int4: `kvserve quantize --method awq` of the float32 directory (same group size; cached), loaded as AWQ.
Embeddings and the LM head stay float32 in the int8 / int4 / AWQ rows.

Text: WikiText-2's test split (../shared/data). Evaluation uses its first half of lines (the first
`--num-tokens` tokens of it), calibration the second half (kvserve/quantize/calibration.py, CALIBRATION_START):
the two never share a token. Perplexity is token-weighted over consecutive `--seq-len` sequences, fed
`--chunk` tokens per step through the engine's paged cache. Also per row: the model's bytes and, unless
`--skip-speed`, batch-1 decode tokens/s (noisy on a shared machine: a sanity check, not a claim).

    .venv/bin/python benchmarks/bench_quant.py > /tmp/quant.json
    .venv/bin/python benchmarks/bench_quant.py --num-tokens 4096 --rows float32,int8 --skip-speed
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import sys
import time
from typing import Any

import torch
from safetensors.torch import save_file

from kvserve import LLM, SamplingParams
from kvserve.engine.perplexity import perplexity
from kvserve.loader.weights import BUNDLED_GGUF, bundled_model_path, open_model
from kvserve.quantize.calibration import CALIBRATION_START, split_lines
from kvserve.quantize.command import QuantizeOptions, quantize

DATA_FILE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
ROWS = ("float32", "gguf_q4_1", "gguf_q4_1_int8_activations", "gguf_q4_1_dequantized", "int8", "int4_rtn",
        "awq_int4")
MIB = 2**20


def log(message: str) -> None:
    """Progress on stderr; stdout carries only the JSON."""
    print(f"[bench_quant {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def float32_dir(cache: pathlib.Path) -> pathlib.Path:
    """The bundled GGUF as a float32 Hugging Face directory, converted by transformers once."""
    out = cache / "smollm2-135m-float32"
    if not (out / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"converting {BUNDLED_GGUF} to float32 safetensors in {out}")
        gguf = bundled_model_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model loaded from GGUF (it counts as quantized), so the dequantized float32
        # tensors and the config are written directly; a tied LM head is the embedding, stored once.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        tied = config.get("tie_word_embeddings", False)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
                 if not (tied and name == "lm_head.weight")}
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        (out / "config.json").write_text(json.dumps(config, indent=2))  # last: it marks the directory complete
    return out


def awq_dir(cache: pathlib.Path, source: pathlib.Path, args: argparse.Namespace) -> pathlib.Path:
    """`kvserve quantize --method awq` of `source`, cached under its settings."""
    out = cache / (f"smollm2-135m-awq-g{args.group_size}-t{args.calibration_tokens}-r{args.search_rows}"
                   f"-a{args.alpha_grid}")
    if not (out / "config.json").is_file():
        log(f"AWQ: calibrating on {args.calibration_tokens} tokens and writing {out}")
        summary = quantize(QuantizeOptions(method="awq", model=str(source), out=str(out),
                                           group_size=args.group_size, calibration_text=str(DATA_FILE),
                                           calibration_tokens=args.calibration_tokens,
                                           search_rows=args.search_rows, alpha_grid=args.alpha_grid,
                                           num_threads=args.threads))
        (out / "kvserve_quantize.json").write_text(json.dumps(summary, indent=2))
    return out


def evaluation_ids(num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of WikiText-2's first half of lines (the bundled tokenizer)."""
    if not DATA_FILE.exists():
        sys.exit(f"bench_quant: WikiText-2 not found at {DATA_FILE}")
    head = split_lines(DATA_FILE.read_text(encoding="utf-8"), CALIBRATION_START)[0]
    ids = open_model(None).load_tokenizer().encode(head, add_special_tokens=False)
    if len(ids) < num_tokens:
        sys.exit(f"bench_quant: the evaluation half has {len(ids)} tokens, fewer than --num-tokens {num_tokens}")
    return ids[:num_tokens]


def split_perplexity(llm: LLM, ids: list[int], seq_len: int, chunk: int) -> float:
    """Token-weighted perplexity over consecutive `seq_len`-token sequences."""
    total_nll, total = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        seq = ids[start:start + seq_len]
        if len(seq) < 2:
            break
        total_nll += math.log(perplexity(llm.engine, seq, chunk)) * (len(seq) - 1)
        total += len(seq) - 1
    return math.exp(total_nll / total)


def decode_rate(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode tokens/s after `prompt` (1 / TPOT), after one warm-up request."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt[:8]}], params, use_tqdm=False)
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return 1 / output.metrics.time_per_output_token


def row_engine(name: str, f32: pathlib.Path, awq: pathlib.Path | None, args: argparse.Namespace) -> LLM:
    """The engine of one row."""
    options: dict[str, Any] = {
        "float32": {"model": str(f32)},
        "gguf_q4_1": {},
        "gguf_q4_1_int8_activations": {"cpu_gguf_int8_activations": True},
        "gguf_q4_1_dequantized": {"quantization": "none"},
        "int8": {"model": str(f32), "quantization": "int8"},
        "int4_rtn": {"model": str(f32), "quantization": "int4", "quantization_group_size": args.group_size},
        "awq_int4": {"model": str(awq)},
    }[name]
    return LLM(kv_cache_memory=256 * MIB, max_num_seqs=4, show_progress=False, num_threads=args.threads, **options)


def measure(name: str, ids: list[int], f32: pathlib.Path, awq: pathlib.Path | None,
            args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one row."""
    llm = row_engine(name, f32, awq, args)
    try:
        row: dict[str, Any] = {"row": name, "quantization": llm.engine.runner.quantization,
                               "model_mib": round(llm.stats().model_bytes / MIB, 1)}
        log(f"{name}: perplexity over {len(ids)} tokens")
        start = time.perf_counter()
        row["perplexity"] = split_perplexity(llm, ids, args.seq_len, args.chunk)
        row["perplexity_seconds"] = round(time.perf_counter() - start, 1)
        if not args.skip_speed:
            row["decode_tok_s_batch1"] = round(decode_rate(llm, ids[:args.seq_len // 2], args.new_tokens), 2)
        return row
    finally:
        llm.engine.shutdown()


def main() -> None:
    """Measure every row and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tokens", type=int, default=16384, help="WikiText-2 tokens to score (first half)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per scored sequence")
    parser.add_argument("--chunk", type=int, default=256, help="tokens fed per step")
    parser.add_argument("--group-size", type=int, default=64, help="int4 / AWQ inputs per group (576 = 9 x 64)")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--search-rows", type=int, default=512)
    parser.add_argument("--alpha-grid", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (speed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=pathlib.Path.home() / ".cache" / "kvserve" /
                        "bench_quant", help="where the float32 and AWQ directories are kept")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if unknown := sorted(set(rows) - set(ROWS)):
        sys.exit(f"bench_quant: unknown rows {unknown}; choose from {list(ROWS)}")
    torch.set_num_threads(args.threads)
    ids = evaluation_ids(args.num_tokens)
    f32 = float32_dir(args.cache_dir)
    awq = awq_dir(args.cache_dir, f32, args) if "awq_int4" in rows else None
    results = [measure(name, ids, f32, awq, args) for name in rows]
    by_name = {row["row"]: row["perplexity"] for row in results}
    if "float32" in by_name:
        for row in results:
            row["perplexity_increase_pct"] = round(100 * (row["perplexity"] / by_name["float32"] - 1), 3)
    checks: dict[str, Any] = {}
    if {"gguf_q4_1", "gguf_q4_1_dequantized"} <= by_name.keys():
        checks["gguf_native_minus_dequantized"] = by_name["gguf_q4_1"] - by_name["gguf_q4_1_dequantized"]
    if {"int8", "float32"} <= by_name.keys():
        checks["int8_within_0.5pct_of_float32"] = by_name["int8"] <= 1.005 * by_name["float32"]
    if {"awq_int4", "int4_rtn"} <= by_name.keys():
        checks["awq_below_int4_rtn"] = by_name["awq_int4"] < by_name["int4_rtn"]
    print(json.dumps({
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": "bundled SmolLM2-135M-Instruct", "text": "WikiText-2 test, first half of its lines",
        "wikitext_tokens": len(ids), "seq_len": args.seq_len, "chunk": args.chunk, "group_size": args.group_size,
        "awq_calibration": {"text": "WikiText-2 test, second half of its lines", "tokens": args.calibration_tokens,
                            "search_rows": args.search_rows, "alpha_grid": args.alpha_grid},
        "rows": results, "checks": checks,
    }, indent=2))


if __name__ == "__main__":
    main()
