"""The workloads, sent by kvserve's own serving client (`kvserve bench serve`) to whichever server runs, and
llama-bench's tgN for reference."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvserve.bench.peers.engines import MODEL_NAME
from kvserve.bench.peers.settings import PeerSettings
from kvserve.bench.serve import BenchConfig, run_benchmark

DECODE_LEVEL = "decode_b1"
WARM_UP_TOKENS = 8
MEASURE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Job:
    """One measurement: `num_requests` streams, `concurrency` in flight, fixed prompt and output lengths."""

    level: str  # "decode_b1" or "c<streams>"
    concurrency: int
    num_requests: int
    input_len: int
    output_len: int
    seed: int  # a different seed per job: prompts never repeat within a server's life, so no prefix cache hits


def jobs_for(settings: PeerSettings) -> list[Job]:
    """Batch-1 decode, then one job per concurrency level."""
    jobs = [Job(DECODE_LEVEL, 1, settings.decode_requests, settings.decode_prompt_len, settings.decode_tokens,
                settings.seed + 1)]
    for index, streams in enumerate(settings.levels, start=2):
        num_requests = max(settings.min_requests, settings.requests_per_stream * streams)
        jobs.append(Job(f"c{streams}", streams, num_requests, settings.input_len, settings.output_len,
                        settings.seed + index))
    return jobs


def warm_up_job(settings: PeerSettings) -> Job:
    """A few short streams before measuring (first-request costs: kernel builds, allocator growth)."""
    streams = min(4, settings.max_streams)
    return Job("warm_up", streams, streams, settings.input_len, WARM_UP_TOKENS, settings.seed + 1000)


def client_config(url: str, job: Job) -> BenchConfig:
    """The client's config for a job: streamed /v1/completions, greedy, EOS ignored, every length exact."""
    return BenchConfig(url=url, model=MODEL_NAME, num_requests=job.num_requests, concurrency=job.concurrency,
                       input_len=job.input_len, output_len=job.output_len, range_ratio=0.0, seed=job.seed,
                       timeout_s=MEASURE_TIMEOUT_S)


def row_from_summary(job: Job, summary: dict[str, Any]) -> dict[str, Any]:
    """The client's summary -> the metrics compared across engines (milliseconds, tokens per second)."""
    row = {"level": job.level, "concurrency": job.concurrency, "num_requests": job.num_requests,
           "completed": summary["completed"], "failures": summary["failures"], "errors": summary["errors"],
           "output_tok_s": summary["output_throughput"],
           "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p99_ms": summary["ttft_ms"]["p99"],
           "itl_p50_ms": summary["itl_ms"]["p50"], "itl_p99_ms": summary["itl_ms"]["p99"],
           "tpot_p50_ms": summary["tpot_ms"]["p50"],
           "lengths_match": summary["total_output_tokens"] == job.num_requests * job.output_len}
    if job.level == DECODE_LEVEL and summary["tpot_ms"]["mean"]:
        row["decode_tok_s"] = round(1000.0 / summary["tpot_ms"]["mean"], 2)  # after the first token
    return row


def measure(url: str, job: Job) -> dict[str, Any]:
    """Run one job against the server at `url`; a client failure is recorded in the row, not raised."""
    async def bounded() -> tuple[dict[str, Any], list[Any]]:
        return await asyncio.wait_for(run_benchmark(client_config(url, job)), timeout=MEASURE_TIMEOUT_S)

    try:
        summary, _ = asyncio.run(bounded())
    except (OSError, TimeoutError, ValueError, RuntimeError) as error:
        return {"level": job.level, "completed": 0, "failures": job.num_requests,
                "errors": [f"{type(error).__name__}: {error}"]}
    return row_from_summary(job, summary)


def llama_bench_command(settings: PeerSettings, llama_bin: Path, gguf: Path) -> list[str]:
    """llama-bench generating llama_bench_tokens tokens after an empty prompt (its tgN), as JSON."""
    return [str(llama_bin / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(settings.llama_bench_tokens),
            "-r", str(settings.llama_bench_repeats), "-t", str(settings.threads), "-o", "json"]


def parse_llama_bench(stdout: str) -> dict[str, float]:
    """llama-bench's JSON list -> {"tg128_tok_s": mean tokens per second, ...}."""
    return {f"tg{test['n_gen']}_tok_s": round(test["avg_ts"], 2) for test in json.loads(stdout)
            if test.get("n_gen") and not test.get("n_prompt")}


def llama_bench(settings: PeerSettings, llama_bin: Path, gguf: Path) -> dict[str, Any]:
    """llama-bench's decode rate on the same file and threads; an error is reported, not raised."""
    try:
        done = subprocess.run(llama_bench_command(settings, llama_bin, gguf), capture_output=True, text=True,
                              timeout=1200, check=True)
        return parse_llama_bench(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
