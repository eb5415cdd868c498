"""KV-cache schemes on the bundled SmolLM2-135M: quality, size, capacity and speed, side by side in one run.

For each kv_cache_dtype (auto = float32 here, float16, bfloat16, int8, fp8, int4):
- perplexity on WikiText-2 test (`--num-tokens` of it, 0 = the whole split), cut into `--seq-len`-token
  sequences fed `--chunk` tokens per step, so every later chunk reads the earlier ones from the cache;
- bytes per token (scales included), and how many concurrent 1,000-token requests a 256 MiB budget holds
  (the engine's own block arithmetic, the int4 residual slots included);
- batch-1 decode tokens/s after a 1,000-token prompt (1 / TPOT), and the generated tokens/s of 16 such
  requests in one `generate` call within the 256 MiB budget (prefill and any preemption included).
Then sinks + window on one long text: perplexity with the full cache, with sinks + window, and window only.

    .venv/bin/python benchmarks/bench_kv.py > /tmp/kv.json
    .venv/bin/python benchmarks/bench_kv.py --num-tokens 0 --skip-speed --skip-window  # the full split
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time
from typing import Any

import torch

from kvserve import LLM, SamplingParams
from kvserve.engine.perplexity import perplexity

DATA_FILE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
SCHEMES = ("auto", "float16", "bfloat16", "int8", "fp8", "int4")
CAPACITY_BUDGET = 256 * 2**20
CAPACITY_TOKENS = 1000
SPEED_CONTEXT = 1000
MIB = 2**20


def log(message: str) -> None:
    """Progress on stderr; stdout carries only the JSON."""
    print(f"[bench_kv {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wikitext_ids() -> list[int]:
    """The whole test split, tokenized."""
    if not DATA_FILE.exists():
        sys.exit(f"bench_kv: WikiText-2 not found at {DATA_FILE}")
    return LLM(kv_cache_memory=MIB, show_progress=False).get_tokenizer().encode(DATA_FILE.read_text(encoding="utf-8"))


def split_perplexity(llm: LLM, ids: list[int], seq_len: int, chunk: int) -> float:
    """Token-weighted perplexity over consecutive `seq_len`-token sequences."""
    total_nll, total = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        seq = ids[start:start + seq_len]
        if len(seq) < 2:
            break
        total_nll += torch.log(torch.tensor(perplexity(llm.engine, seq, chunk))).item() * (len(seq) - 1)
        total += len(seq) - 1
    return float(torch.exp(torch.tensor(total_nll / total)))


def max_concurrent(llm: LLM, scheme: str, budget: int, num_tokens: int) -> int:
    """Most requests of `num_tokens` tokens that fit together in `budget` bytes (int4: each with a residual slot)."""
    engine = llm.engine
    block_size = engine.kv_manager.block_size
    per_block = engine.runner.kv_cache_bytes - engine.kv_residual_bytes
    per_block //= engine.kv_manager.num_blocks
    per_slot = engine.kv_residual_bytes // engine.config.scheduler.max_num_seqs if scheme == "int4" else 0
    per_request = -(-num_tokens // block_size) * per_block + per_slot
    return budget // per_request


def decode_rate(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode tokens/s after `prompt`: 1 / TPOT (prefill excluded)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return 1 / output.metrics.time_per_output_token


def batch_throughput(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """(generated tokens / wall seconds, preemptions) for all prompts in one generate call, prefill included.

    Per-request TPOT would flatter a small cache: requests that wait are not decoding, so fewer run at once.
    """
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    before = llm.engine.scheduler.num_preemptions
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return generated / elapsed, llm.engine.scheduler.num_preemptions - before


def scheme_row(scheme: str, ids: list[int], contexts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one kv_cache_dtype."""
    llm = LLM(kv_cache_memory=CAPACITY_BUDGET, kv_cache_dtype=scheme, max_num_seqs=16, show_progress=False,
              num_threads=args.threads)
    row: dict[str, Any] = {
        "kv_cache_dtype": scheme,
        "bytes_per_token": llm.engine.kv_bytes_per_token,
        "block_size": llm.engine.kv_manager.block_size,
        "residual_bytes_per_request": llm.engine.kv_residual_bytes // 16,
        f"max_concurrent_{CAPACITY_TOKENS}_token_requests_in_256MiB": max_concurrent(
            llm, scheme, CAPACITY_BUDGET, CAPACITY_TOKENS),
    }
    log(f"{scheme}: perplexity over {len(ids)} tokens")
    start = time.perf_counter()
    row["perplexity"] = split_perplexity(llm, ids, args.seq_len, args.chunk)
    row["perplexity_seconds"] = round(time.perf_counter() - start, 1)
    if not args.skip_speed:
        decode_rate(llm, contexts[0], 8)  # warm-up
        log(f"{scheme}: decode speed")
        row["decode_tok_s_batch1"] = round(decode_rate(llm, contexts[1], args.new_tokens), 2)
        rate, preemptions = batch_throughput(llm, contexts[2:], args.new_tokens)
        row[f"throughput_tok_s_16x{SPEED_CONTEXT}"] = round(rate, 2)
        row["preemptions_16x"] = preemptions
    return row


def window_rows(ids: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Perplexity of one long text: full cache, then per cache size C: sinks + window (S + (C - S)), window only (C)."""
    configs: list[tuple[str, dict[str, int]]] = [("full cache", {})]
    for size in (int(size) for size in args.cache_sizes.split(",")):
        window = size - args.sinks
        configs.append((f"sinks {args.sinks} + window {window}", {"kv_window": window, "kv_sinks": args.sinks}))
        configs.append((f"window {size} only", {"kv_window": size, "kv_sinks": 0}))
    rows = []
    for name, options in configs:
        llm = LLM(kv_cache_memory=512 * MIB, max_model_len=len(ids), max_num_seqs=1, show_progress=False,
                  num_threads=args.threads, **options)
        log(f"window: {name} over {len(ids)} tokens")
        rows.append({"cache": name, **options, "perplexity": perplexity(llm.engine, ids, args.chunk)})
    return rows


def main() -> None:
    """Run every scheme, then the window comparison, and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tokens", type=int, default=16384, help="WikiText-2 tokens to score (0: all)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per scored sequence")
    parser.add_argument("--chunk", type=int, default=256, help="tokens fed per step")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per request (speed)")
    parser.add_argument("--long-tokens", type=int, default=4096, help="length of the sinks/window text")
    parser.add_argument("--cache-sizes", default="256,1024", help="tokens kept (sinks + window), comma-separated")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-window", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    all_ids = wikitext_ids()
    ids = all_ids if args.num_tokens == 0 else all_ids[:args.num_tokens]
    # Distinct prompts for the warm-up, the batch-1 run and the 16 requests: no prefix-cache hits between them.
    contexts = [all_ids[i * SPEED_CONTEXT:(i + 1) * SPEED_CONTEXT] for i in range(18)]
    rows = [scheme_row(scheme, ids, contexts, args) for scheme in args.schemes.split(",")]
    baseline = next((r["perplexity"] for r in rows if r["kv_cache_dtype"] == "auto"), None)
    for row in rows:
        if baseline:
            row["perplexity_increase_pct"] = round(100 * (row["perplexity"] / baseline - 1), 3)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": "bundled SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32; auto = float32 cache)",
        "wikitext_tokens": len(ids), "seq_len": args.seq_len, "chunk": args.chunk,
        "schemes": rows,
    }
    if not args.skip_window:
        result["window"] = window_rows(all_ids[:args.long_tokens], args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
