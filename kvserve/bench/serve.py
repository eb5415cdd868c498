"""Serving benchmark client: Poisson arrivals of streamed completions; TTFT, TPOT, ITL and throughput as JSON."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

# Plain words for prompts: about one token each for a BPE tokenizer, so word counts ~ token counts.
_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
          "have an they you were her she there been one all we their has would when if so no will can more "
          "other what time up some into them out then only its could two over new first may these people "
          "after most made also did many before must through back years where much way well down should "
          "because each just those how too little state good very make world still own see men work long "
          "here get both between life being under never day same another know while last might us great "
          "old year off come since against go came right used take three").split()
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class BenchConfig:
    """What to send: how many requests, how fast, how many at once, and their lengths."""

    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model of GET /v1/models
    num_requests: int = 64
    request_rate: float = math.inf  # requests per second (Poisson); inf sends all at once
    concurrency: int | None = None  # most requests in flight; None: unlimited
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.5  # lengths are drawn uniformly from len * [1 - ratio, 1 + ratio]
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0


@dataclass
class RequestResult:
    """One request as the client saw it."""

    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between content chunks after the first
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_workload(config: BenchConfig) -> list[tuple[str, int]]:
    """Seeded (prompt, max_tokens) pairs."""
    rng = random.Random(config.seed)

    def length(mean: int) -> int:
        low, high = max(1, round(mean * (1 - config.range_ratio))), max(1, round(mean * (1 + config.range_ratio)))
        return rng.randint(low, high)

    return [(" ".join(rng.choices(_WORDS, k=length(config.input_len))), length(config.output_len))
            for _ in range(config.num_requests)]


def arrival_delays(config: BenchConfig) -> list[float]:
    """Seconds to wait before each request: exponential gaps (a Poisson process), or none at rate inf."""
    if math.isinf(config.request_rate):
        return [0.0] * config.num_requests
    rng = random.Random(config.seed + 1)
    return [rng.expovariate(config.request_rate) for _ in range(config.num_requests)]


async def send_request(client: httpx.AsyncClient, config: BenchConfig, model: str, prompt: str,
                max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{config.url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    result.ok = result.error is None
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    continue
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(choice.get("text") for choice in chunk.get("choices", [])):
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    result.latency = time.perf_counter() - start
    if result.ok and result.ttft is None:
        result.ok, result.error = False, "no content was streamed"
    return result


async def _served_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    if config.model is not None:
        return config.model
    response = await client.get(f"{config.url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_benchmark(config: BenchConfig, show_progress: bool = False
                        ) -> tuple[dict[str, Any], list[RequestResult]]:
    """Send the workload; returns the summary and every request's result (a bar of finished requests on stderr
    with `show_progress`)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency or config.num_requests)
    async with httpx.AsyncClient(headers=headers, timeout=config.timeout_s, limits=limits) as client:
        model = await _served_model(client, config)
        gate = asyncio.Semaphore(config.concurrency or config.num_requests)

        bar = tqdm(total=config.num_requests, desc="requests", unit="req", disable=not show_progress)

        async def one(prompt: str, max_tokens: int) -> RequestResult:
            async with gate:
                result = await send_request(client, config, model, prompt, max_tokens)
            bar.update(1)
            return result

        tasks = []
        start = time.perf_counter()
        with bar:
            for (prompt, max_tokens), delay in zip(make_workload(config), arrival_delays(config), strict=True):
                await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(prompt, max_tokens)))
            results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(config, model, results, duration), results


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values) * 1000
    return {"mean": round(float(array.mean()), 2),
            **{f"p{p}": round(float(np.percentile(array, p)), 2) for p in PERCENTILES}}


def summarize(config: BenchConfig, model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughput and latency percentiles (milliseconds) of the successful requests."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    errors = sorted({r.error for r in results if r.error})
    return {
        "model": model,
        "config": {k: (None if isinstance(v, float) and math.isinf(v) else v)
                   for k, v in asdict(config).items() if k != "api_key"},
        "completed": len(done),
        "failures": len(results) - len(done),
        "errors": errors[:5],
        "duration_s": round(duration, 3),
        "request_throughput": round(len(done) / duration, 3),
        "output_throughput": round(output_tokens / duration, 2),  # generated tokens per second
        "total_token_throughput": round((prompt_tokens + output_tokens) / duration, 2),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "ttft_ms": _stats_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": _stats_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itl]),
        "e2e_latency_ms": _stats_ms([r.latency for r in done]),
    }
