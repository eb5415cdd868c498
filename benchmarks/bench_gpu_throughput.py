"""GPU offline throughput: kvserve vs transformers on random-weight SmolLM2-135M / Qwen3-0.6B shapes, one run.

Workload (seeded): 256 requests, prompt lengths and output lengths each uniform in [100, 1024], random
token ids, greedy with EOS ignored, bfloat16 weights and KV cache. Each model shape is saved once as a
random-weight HF checkpoint in a temp dir, and both engines load that same checkpoint.
- kvserve: one `LLM.generate` call with every request (continuous batching, paged KV, Triton attention).
- transformers: `generate` on left-padded static batches of --hf-batch-size requests in arrival order;
  a batch runs to its longest output (min_new_tokens = max_new_tokens) and only the tokens each
  request asked for count as output.
Both get one untimed warm-up first (Triton kernels compile on first use). Prints one JSON object on stdout,
progress on stderr. Exits with status 2 and a message where there is no CUDA device.

    .venv/bin/python benchmarks/bench_gpu_throughput.py > /tmp/gpu_throughput.json
    .venv/bin/python benchmarks/bench_gpu_throughput.py --models qwen3-0.6b --skip-hf
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
from typing import Any

from gpu_models import SHAPES, machine_info, require_cuda, save_random_model

Workload = list[tuple[list[int], int]]  # (prompt token ids, output length) per request
FIRST_TOKEN_ID = 3  # ids 0-2 are bos / eos / pad in the saved tokenizer


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_workload(num_requests: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], vocab_size: int,
                  seed: int) -> Workload:
    """Seeded random prompts; prompt and output lengths uniform in their (inclusive) ranges."""
    rng = random.Random(seed)
    workload = []
    for _ in range(num_requests):
        prompt = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(rng.randint(*prompt_lens))]
        workload.append((prompt, rng.randint(*output_lens)))
    return workload


def run_kvserve(path: pathlib.Path, workload: Workload, warmup: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Every request in one generate call; throughput over the wall time of that call."""
    import torch

    from kvserve import LLM, SamplingParams

    llm = LLM(model=str(path), device="cuda", dtype="bfloat16", kv_cache_dtype=args.kv_cache_dtype,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_fraction=args.kv_cache_memory_fraction, show_progress=False)

    def generate(requests: Workload) -> tuple[list[Any], float]:
        prompts = [{"prompt_token_ids": prompt} for prompt, _ in requests]
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        return outputs, time.perf_counter() - start

    generate(warmup)
    preemptions_before = llm.stats().num_preemptions
    outputs, wall = generate(workload)
    stats = llm.stats()
    result = _throughput(workload, sum(len(o.outputs[0].token_ids) for o in outputs), wall)
    result.update(
        ttft_p50_s=_median([o.metrics.time_to_first_token for o in outputs]),
        tpot_p50_s=_median([o.metrics.time_per_output_token for o in outputs]),
        num_preemptions=stats.num_preemptions - preemptions_before,
        kv_cache_bytes=stats.kv_cache_bytes, kv_blocks_total=stats.kv_blocks_total,
        peak_gpu_memory_bytes=torch.cuda.max_memory_allocated())
    return result


def run_transformers(path: pathlib.Path, workload: Workload, warmup: Workload,
                     args: argparse.Namespace) -> dict[str, Any]:
    """Static left-padded batches in arrival order; each runs to its longest requested output."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    pad_id = model.config.pad_token_id

    def generate(requests: Workload) -> tuple[int, float]:
        num_computed = 0
        torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, len(requests), args.hf_batch_size):
            batch = requests[first:first + args.hf_batch_size]
            input_ids, mask = _left_pad([prompt for prompt, _ in batch], pad_id)
            num_new = max(n for _, n in batch)
            with torch.no_grad():
                out = model.generate(input_ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=num_new,
                                     min_new_tokens=num_new, do_sample=False, pad_token_id=pad_id)
            num_computed += out.shape[0] * (out.shape[1] - input_ids.shape[1])
        torch.cuda.synchronize()
        return num_computed, time.perf_counter() - start

    generate(warmup)
    num_computed, wall = generate(workload)
    # Only the tokens a request asked for are output; a batch's padding steps are its cost.
    result = _throughput(workload, sum(n for _, n in workload), wall)
    result.update(num_computed_tokens=num_computed, batch_size=args.hf_batch_size,
                  peak_gpu_memory_bytes=torch.cuda.max_memory_allocated())
    return result


def _throughput(workload: Workload, num_generated: int, wall: float) -> dict[str, Any]:
    num_prompt = sum(len(prompt) for prompt, _ in workload)
    return {"num_requests": len(workload), "num_prompt_tokens": num_prompt, "num_generated_tokens": num_generated,
            "wall_s": wall, "output_tokens_per_s": num_generated / wall,
            "total_tokens_per_s": (num_prompt + num_generated) / wall, "requests_per_s": len(workload) / wall}


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """[B] prompts -> input_ids, attention_mask [B, longest], padded on the left as HF generate expects."""
    import torch

    longest = max(map(len, prompts))
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    return input_ids, mask


def _free_gpu() -> None:
    """Collect the last engine's tensors and reset the peak-memory counter."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _median(values: list[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    return present[len(present) // 2] if present else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (parsed before torch is imported, so --help is instant anywhere)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100, help="shortest prompt and output")
    parser.add_argument("--max-len", type=int, default=1024, help="longest prompt and output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only benchmark kvserve")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="transformers static batch size")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="kvserve max_num_seqs")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="kvserve step token budget")
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=0.6,
                        help="kvserve: fraction of free GPU memory for the KV cache")
    parser.add_argument("--kv-cache-dtype", default="auto", help="kvserve KV-cache storage")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model shape(s) {sorted(unknown)}; choose from {list(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Benchmark each shape with both engines and print the JSON."""
    args = parse_args(argv)
    require_cuda()
    lengths = (args.min_len, args.max_len)
    results: dict[str, Any] = {}
    for shape in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"kvserve-{shape}-") as tmp:
            path = pathlib.Path(tmp)
            log(f"{shape}: saving random weights to {path}")
            fields = save_random_model(shape, path)
            workload = make_workload(args.num_requests, lengths, lengths, fields["vocab_size"], args.seed)
            # Contexts past 512 keys, so that the split-KV decode and its merge kernel compile here too.
            warmup = make_workload(4, (520, 600), (8, 16), fields["vocab_size"], args.seed + 1)
            entry: dict[str, Any] = {}
            log(f"{shape}: kvserve, {len(workload)} requests")
            entry["kvserve"] = run_kvserve(path, workload, warmup, args)
            _free_gpu()  # the engine is gone with run_kvserve's frame: give its memory back before the peer
            if not args.skip_hf:
                log(f"{shape}: transformers, batches of {args.hf_batch_size}")
                entry["transformers"] = run_transformers(path, workload, warmup, args)
                _free_gpu()
                entry["kvserve_over_transformers"] = (entry["kvserve"]["output_tokens_per_s"]
                                                      / entry["transformers"]["output_tokens_per_s"])
            results[shape] = entry
    print(json.dumps({
        "benchmark": "gpu_throughput",
        "machine": machine_info(),
        "workload": {"num_requests": args.num_requests, "prompt_len": lengths, "output_len": lengths,
                     "seed": args.seed, "dtype": "bfloat16", "ignore_eos": True, "greedy": True},
        "config": {k: v for k, v in vars(args).items() if k not in ("models",)},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
