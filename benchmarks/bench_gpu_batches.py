"""GPU decode at fixed batch sizes: kvserve with and without CUDA graphs vs transformers, against the HBM roofline.

For the random-weight SmolLM2-135M and Qwen3-0.6B shapes (bfloat16), B requests of --prompt-len random tokens each
generate --new-tokens greedy tokens (EOS ignored), all submitted at once, for each B in --batch-sizes:
- kvserve: one `LLM.generate` call, with CUDA graphs (the default) and with enforce_eager. The whole batch is one
  prefill step (max_num_batched_tokens = B * prompt_len), then B requests decode in lockstep: TPOT is the
  requests' median time per output token, decode tokens/s = B / TPOT.
- transformers eager: `generate` on the batch (equal prompt lengths: no padding); TPOT from streamer timestamps.
Both run one untimed batch first (Triton compiles, cuBLAS picks its kernels). HBM fraction: the bytes a decode
step reads (the weights once, each request's K/V at the mean context) / TPOT, over a device-to-device copy's
bandwidth (bytes read + written), the practical ceiling. Prints one JSON object; exits 2 where there is no CUDA.

    python3 benchmarks/bench_gpu_batches.py > /tmp/gpu_batches.json
    python3 benchmarks/bench_gpu_batches.py --models smollm2-135m --batch-sizes 1,256 --skip-hf
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time
from typing import Any

from gpu_models import SHAPES, kv_bytes_per_token, machine_info, require_cuda, save_random_model, weight_bytes

FIRST_TOKEN_ID = 3  # ids 0-2 are bos / eos / pad in the saved tokenizer
GB = 1e9


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class TimestampStreamer:
    """A `generate` streamer recording when each put() happens (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


def batches(vocab_size: int, args: argparse.Namespace) -> dict[int, list[list[int]]]:
    """Fresh random prompts for each batch size (no prefix-cache hits between runs)."""
    rng = random.Random(args.seed)
    return {size: [[rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(args.prompt_len)]
                   for _ in range(size)] for size in args.batch_sizes}


def run_kvserve(path: pathlib.Path, prompts: dict[int, list[list[int]]], args: argparse.Namespace,
                enforce_eager: bool) -> dict[int, dict[str, float]]:
    """TPOT and wall time of each batch through one engine."""
    from kvserve import LLM, SamplingParams

    largest = max(prompts)
    started = time.perf_counter()
    llm = LLM(model=str(path), device="cuda", dtype="bfloat16", enforce_eager=enforce_eager,
              max_num_seqs=largest, max_num_batched_tokens=largest * args.prompt_len,
              max_model_len=args.prompt_len + args.new_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
              show_progress=False)
    log(f"kvserve (enforce_eager={enforce_eager}) ready in {time.perf_counter() - started:.1f} s")
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[min(prompts)][:2]], params, use_tqdm=False)  # warm-up
    results = {}
    for size, batch in prompts.items():
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        wall = time.perf_counter() - started
        tpot = statistics.median(o.metrics.time_per_output_token for o in outputs)
        results[size] = {"tpot_s": tpot, "wall_s": wall}
    llm.engine.shutdown()
    return results


def run_transformers(path: pathlib.Path, prompts: dict[int, list[list[int]]],
                     args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """TPOT and wall time of each batch through transformers' eager generate."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()

    def generate(batch: list[list[int]]) -> tuple[float, float]:
        streamer = TimestampStreamer()
        ids = torch.tensor(batch, device="cuda")
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2, streamer=streamer)
        wall = time.perf_counter() - started
        tokens = streamer.times[1:]  # [0] is the prompt
        return (tokens[-1] - tokens[0]) / (len(tokens) - 1), wall

    generate(prompts[min(prompts)][:2])  # warm-up
    results = {}
    for size, batch in prompts.items():
        tpot, wall = generate(batch)
        results[size] = {"tpot_s": tpot, "wall_s": wall}
    return results


def copy_bandwidth(num_bytes: int = 1 << 30, num_repeats: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(num_repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * num_bytes * num_repeats / (start.elapsed_time(end) / 1e3)


def bench_shape(shape: str, args: argparse.Namespace, copy_gb_per_s: float) -> dict[str, Any]:
    """Every engine on one shape's random checkpoint, every batch size, and the ratios."""
    with tempfile.TemporaryDirectory(prefix=f"kvserve-{shape}-") as tmp:
        path = pathlib.Path(tmp)
        fields = save_random_model(shape, path)
        prompts = batches(fields["vocab_size"], args)
        engines = {"kvserve_graphs": lambda: run_kvserve(path, prompts, args, enforce_eager=False),
                   "kvserve_eager": lambda: run_kvserve(path, prompts, args, enforce_eager=True)}
        if not args.skip_hf:
            engines["transformers_eager"] = lambda: run_transformers(path, prompts, args)
        runs = {}
        for name, run in engines.items():
            log(f"{shape}: {name}")
            runs[name] = run()
            _free_gpu()
    mean_context = args.prompt_len + args.new_tokens / 2
    entry: dict[str, Any] = {"weight_bytes": weight_bytes(fields), "mean_context_tokens": mean_context}
    for size in args.batch_sizes:
        step_bytes = weight_bytes(fields) + size * kv_bytes_per_token(fields) * mean_context
        row: dict[str, Any] = {"bytes_read_per_step": step_bytes}
        for name, results in runs.items():
            tpot = results[size]["tpot_s"]
            row[name] = {"tpot_ms": tpot * 1e3, "decode_tokens_per_s": size / tpot,
                         "end_to_end_tokens_per_s": size * args.new_tokens / results[size]["wall_s"],
                         "hbm_fraction": step_bytes / tpot / GB / copy_gb_per_s}
        for name in runs:
            if name != "kvserve_graphs":
                row[f"kvserve_graphs_speedup_vs_{name}"] = (row[name]["tpot_ms"] / row["kvserve_graphs"]["tpot_ms"])
        entry[f"batch_{size}"] = row
    return entry


def _free_gpu() -> None:
    """Collect the last engine's tensors before the next one loads."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (parsed before torch is imported, so --help is instant anywhere)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--batch-sizes", default="1,32,256", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only benchmark kvserve")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="kvserve's share of the GPU")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model shape(s) {sorted(unknown)}; choose from {list(SHAPES)}")
    args.batch_sizes = sorted({int(size) for size in args.batch_sizes.split(",")})
    if args.batch_sizes[0] < 1:
        parser.error("--batch-sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure every shape, engine and batch size; print the JSON."""
    args = parse_args(argv)
    require_cuda()
    copy_gb_per_s = copy_bandwidth() / GB
    results = {shape: bench_shape(shape, args, copy_gb_per_s) for shape in args.models.split(",")}
    print(json.dumps({
        "benchmark": "gpu_batches",
        "machine": machine_info(),
        "device_copy_gb_per_s": copy_gb_per_s,
        "workload": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": "bfloat16",
                     "greedy": True, "ignore_eos": True},
        "config": {k: v for k, v in vars(args).items() if k != "models"},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
