"""Prefill/decode disaggregation against one instance with chunked prefill, on the same cores (issue 17).

Running decodes stall when long prompts arrive at the same engine: each step that carries a prompt chunk is
longer. Disaggregated, a prefill instance computes the prompts and the decode instance only takes their blocks.
This script measures that trade on the same total cores: `one` is `kvserve serve` with all the cores; `split`
is a prefill instance and a decode instance, each pinned to half of them (taskset) with as many threads.

Workload, through the same streaming client as `kvserve bench serve`: `--decode-streams` requests with short
prompts decode `--decode-tokens` tokens each; one second in, `--long-prompts` prompts of `--long-words` words
(max_tokens 8) arrive `--gap-s` apart. Reported per layout: the decode streams' ITL p50 / p99 / max and tokens/s,
and the long prompts' TTFT. Prints JSON.

    .venv/bin/python benchmarks/bench_disagg.py
    .venv/bin/python benchmarks/bench_disagg.py --layouts one,split --long-words 1500 --decode-streams 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np

from kvserve.bench.serve import BenchConfig, RequestResult, send_request

WORDS = "the of and to in is that for it as was with be by on not he this are or his from at which but have".split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, cores: list[int], extra: list[str], model: str | None) -> subprocess.Popen:
    """`kvserve serve` pinned to `cores`, one torch thread per core."""
    command = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "kvserve.cli", "serve",
               "--port", str(port), "--num-threads", str(len(cores)), "--log-level", "warning", *extra]
    if model:
        command += ["--model", model]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server on {url} exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the server on {url} did not become healthy")


@contextlib.contextmanager
def layout(name: str, model: str | None, cores: list[int]) -> Iterator[str]:
    """The URL requests go to, with its servers running."""
    processes = []
    try:
        if name == "one":
            port = free_port()
            processes.append(start_server(port, cores, [], model))
        else:
            half = len(cores) // 2
            address = f"127.0.0.1:{free_port()}"
            port = free_port()
            processes.append(start_server(free_port(), cores[half:], ["--role", "prefill", "--kv-transfer-address",
                                                                      address], model))
            processes.append(start_server(port, cores[:half], ["--role", "decode", "--kv-transfer-address", address],
                                          model))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, processes[-1])
        yield url
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(60)


def prompt(words: int, rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=words))


async def wait_for_link(url: str, words: int) -> None:
    """Until a long prompt comes back with cached tokens (its blocks fetched from the prefill instance)."""
    rng = random.Random(-1)
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        for _ in range(120):
            body = {"model": model, "prompt": prompt(words, rng), "max_tokens": 1}
            usage = (await client.post(f"{url}/v1/completions", json=body)).json()["usage"]
            if (usage.get("prompt_tokens_details") or {}).get("cached_tokens"):
                return
            await asyncio.sleep(1)
    raise RuntimeError("the decode instance never received blocks from the prefill instance")


async def workload(url: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    config = BenchConfig(url=url, timeout_s=1800)
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=64)) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]

        async def long_prompts() -> list[RequestResult]:
            await asyncio.sleep(1.0)
            tasks = []
            for _ in range(args.long_prompts):
                tasks.append(asyncio.create_task(send_request(client, config, model, prompt(args.long_words, rng), 8)))
                await asyncio.sleep(args.gap_s)
            return await asyncio.gather(*tasks)

        started = time.perf_counter()
        decodes = [send_request(client, config, model, prompt(16, rng), args.decode_tokens)
                   for _ in range(args.decode_streams)]
        *streams, longs = await asyncio.gather(*decodes, long_prompts())
        duration = time.perf_counter() - started
    itl = np.asarray([gap for result in streams for gap in result.itl]) * 1000
    errors = sorted({r.error for r in [*streams, *longs] if r.error})
    return {
        "decode_itl_ms": {"p50": round(float(np.percentile(itl, 50)), 1),
                          "p99": round(float(np.percentile(itl, 99)), 1),
                          "max": round(float(itl.max()), 1)} if itl.size else None,
        "decode_tokens_per_s": round(sum(r.output_tokens for r in streams) / duration, 1),
        "long_prompt_ttft_ms_p50": round(float(np.median([r.ttft for r in longs if r.ttft])) * 1000, 1)
        if any(r.ttft for r in longs) else None,
        "long_prompt_tokens": longs[0].prompt_tokens if longs else None,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--layouts", default="one,split")
    parser.add_argument("--cores", default=None, help="CPU ids to use, e.g. 0,1 (default: all of this process's)")
    parser.add_argument("--decode-streams", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--long-prompts", type=int, default=4)
    parser.add_argument("--long-words", type=int, default=1000)
    parser.add_argument("--gap-s", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cores = [int(c) for c in args.cores.split(",")] if args.cores else sorted(os.sched_getaffinity(0))
    results = {}
    for name in args.layouts.split(","):
        with layout(name, args.model, cores) as url:
            if name == "split":
                asyncio.run(wait_for_link(url, args.long_words))
            results[name] = asyncio.run(workload(url, args))
        print(json.dumps({name: results[name]}), file=sys.stderr)
    print(json.dumps({"settings": vars(args) | {"cores": cores}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
