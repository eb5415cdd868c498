"""GPU batch-1 latency: TPOT and achieved memory bandwidth, kvserve vs transformers, in one run.

For the random-weight SmolLM2-135M and Qwen3-0.6B shapes (bfloat16), one request at a time: a
--prompt-len-token random prompt, then --new-tokens greedy tokens with EOS ignored.
- kvserve: `LLM.generate`; TPOT from the request's metrics (first to last token / (n - 1)).
- transformers eager: `generate` with its dynamic cache; TPOT from streamer timestamps.
- transformers static: `generate(cache_implementation="static")`, which on CUDA compiles the forward
  with torch.compile (CUDA graphs: mode "reduce-overhead"); two untimed runs compile first.
Achieved bandwidth = (weight bytes + KV bytes read per step) / TPOT, the KV bytes at the mean context
of the decode steps; next to it, a device-to-device copy's bandwidth as the practical ceiling.
Best (lowest TPOT) of --repeats runs, each with a fresh prompt. Prints one JSON object on stdout.
Exits with status 2 and a message where there is no CUDA device.

    .venv/bin/python benchmarks/bench_gpu_latency.py > /tmp/gpu_latency.json
    .venv/bin/python benchmarks/bench_gpu_latency.py --models smollm2-135m --skip-hf
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import random
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from gpu_models import SHAPES, kv_bytes_per_token, machine_info, require_cuda, save_random_model, weight_bytes

FIRST_TOKEN_ID = 3  # ids 0-2 are bos / eos / pad in the saved tokenizer
GB = 1e9
# KV bytes per cached element: bfloat16, or 1-byte codes plus a float32 scale per head_dim elements.
KV_ELEMENT_BYTES = {"auto": 2.0, "int8": 1.0, "fp8": 1.0}


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class TimestampStreamer:
    """A `generate` streamer recording when each put() happens (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        """Record the time a token (or, first, the prompt) was handed over."""
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


def kvserve_tpot(path: pathlib.Path, prompts: list[list[int]], args: argparse.Namespace) -> list[float]:
    """TPOT of each prompt run alone through kvserve (the first prompt is the warm-up)."""
    from kvserve import LLM, SamplingParams

    llm = LLM(model=str(path), device="cuda", dtype="bfloat16", kv_cache_dtype=args.kv_cache_dtype,
              kv_cache_memory_fraction=args.kv_cache_memory_fraction, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    tpots = []
    for prompt in prompts:
        output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        tpots.append(output.metrics.time_per_output_token)
    return tpots[1:]


def transformers_tpot(path: pathlib.Path, prompts: list[list[int]], args: argparse.Namespace,
                      static: bool) -> list[float]:
    """TPOT of each prompt through HF generate, eager or static cache + compile (the first prompt warms up).

    Static: the warm-up runs twice, as compiling (and capturing the CUDA graphs) spans the first calls.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    extra = {"cache_implementation": "static"} if static else {}
    num_warmup = 2 if static else 1
    tpots = []
    for prompt in prompts[:1] * num_warmup + prompts[1:]:
        streamer = TimestampStreamer()
        with torch.no_grad():
            model.generate(torch.tensor([prompt], device="cuda"), attention_mask=torch.ones(1, len(prompt),
                           dtype=torch.long, device="cuda"), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id,
                           streamer=streamer, **extra)
        tokens = streamer.times[1:]  # [0] is the prompt
        tpots.append((tokens[-1] - tokens[0]) / (len(tokens) - 1))
    return tpots[num_warmup:]


def copy_bandwidth(num_bytes: int = 1 << 30, num_repeats: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second: the practical bandwidth ceiling."""
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


def summarize(tpots: list[float], bytes_per_step: float) -> dict[str, Any]:
    """Best and all TPOTs, and the bandwidth the best one achieves."""
    best = min(tpots)
    return {"tpot_s": best, "tpot_runs_s": tpots, "tokens_per_s": 1 / best,
            "achieved_gb_per_s": bytes_per_step / best / GB}


def bench_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """All engines on one shape, sharing one random checkpoint and the same prompts."""
    with tempfile.TemporaryDirectory(prefix=f"kvserve-{shape}-") as tmp:
        path = pathlib.Path(tmp)
        log(f"{shape}: saving random weights to {path}")
        fields = save_random_model(shape, path)
        rng = random.Random(args.seed)
        # One fresh prompt per run (a prefix-cache hit would only change TTFT, but keep runs alike).
        prompts = [[rng.randrange(FIRST_TOKEN_ID, fields["vocab_size"]) for _ in range(args.prompt_len)]
                   for _ in range(args.repeats + 1)]
        mean_context = args.prompt_len + args.new_tokens / 2
        # Per cached element: the element itself, plus a float32 scale per head_dim elements if quantized.
        quant_scale = 0.0 if args.kv_cache_dtype == "auto" else 4 / fields["head_dim"]
        kv_elem = KV_ELEMENT_BYTES[args.kv_cache_dtype] + quant_scale
        kv_bytes = kv_bytes_per_token(fields, 1) * kv_elem * mean_context
        bf16_kv_bytes = kv_bytes_per_token(fields, 2) * mean_context
        weights = weight_bytes(fields)
        entry: dict[str, Any] = {"weight_bytes": weights, "mean_context_tokens": mean_context,
                                 "kv_bytes_per_step": kv_bytes}
        runs: list[tuple[str, Callable[[], list[float]], float]] = [
            ("kvserve", lambda: kvserve_tpot(path, prompts, args), weights + kv_bytes)]
        if not args.skip_hf:
            runs += [("transformers_eager", lambda: transformers_tpot(path, prompts, args, static=False),
                      weights + bf16_kv_bytes),
                     ("transformers_static_compile", lambda: transformers_tpot(path, prompts, args, static=True),
                      weights + bf16_kv_bytes)]
        for name, run, bytes_per_step in runs:
            log(f"{shape}: {name}")
            entry[name] = summarize(run(), bytes_per_step)
            _free_gpu()
        for name in ("transformers_eager", "transformers_static_compile"):
            if name in entry:
                entry[f"kvserve_speedup_vs_{name.removeprefix('transformers_')}"] = (
                    entry[name]["tpot_s"] / entry["kvserve"]["tpot_s"])
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
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per engine (plus warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only benchmark kvserve")
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=0.2,
                        help="kvserve: fraction of free GPU memory for the KV cache")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_ELEMENT_BYTES),
                        help="kvserve KV-cache storage")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model shape(s) {sorted(unknown)}; choose from {list(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure every shape with every engine and print the JSON."""
    args = parse_args(argv)
    require_cuda()
    results = {shape: bench_shape(shape, args) for shape in args.models.split(",")}
    print(json.dumps({
        "benchmark": "gpu_latency",
        "machine": machine_info(),
        "device_copy_gb_per_s": copy_bandwidth() / GB,
        "workload": {"batch_size": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "dtype": "bfloat16", "greedy": True, "ignore_eos": True},
        "config": {k: v for k, v in vars(args).items() if k != "models"},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
