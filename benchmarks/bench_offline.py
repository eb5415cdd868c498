"""Offline benchmark: kvserve vs Hugging Face transformers on the same weights, in one run.

Both engines run the bundled SmolLM2-135M-Instruct GGUF (kvserve on its 4-bit blocks by default, the same
model up to float rounding; `--kvserve-option quantization=none` dequantizes it to float32 as transformers does),
on the same prompts (token ids), with the same torch thread count. Prints one JSON object to stdout;
progress goes to stderr.

    .venv/bin/python benchmarks/bench_offline.py > /tmp/bench.json
    .venv/bin/python benchmarks/bench_offline.py --skip-hf --only decode,prefill
    .venv/bin/python benchmarks/bench_offline.py --only batch16 --only batch64 --new-tokens 64
    .venv/bin/python benchmarks/bench_offline.py --wait-quiet 120 > /tmp/bench.json  # shared box

Workloads (each has a warm-up run first; see `method` in the JSON for how repeats are reduced):
- decode:  batch 1, a 16-token prompt (the start of WikiText-2), `--new-tokens` greedy tokens
           with EOS ignored;
           rate = (new tokens - 1) / (time from the first to the last generated token).
- prefill: a 1,000-token WikiText-2 prompt, time to generate 1 token; a fresh slice of the
           text every run, so that a prefix cache can never hit.
- batch16 / batch64: 16 / 64 requests with seeded prompt lengths in [32, 256] tokens cut from
           WikiText-2, `--new-tokens` each; a fresh prompt set every run (a repeat would hit
           kvserve's prefix cache). kvserve: one `generate` call (continuous batching);
           HF: one left-padded static batch. Throughput = generated tokens / wall time.
Each engine runs alone in a fresh process per round: round i is a kvserve process, then a transformers
process, each warming up and measuring run i of every workload. Alternating keeps a slow phase of a shared
machine from hitting one engine's whole series, and separate processes keep the engines from slowing each
other (kvserve decoded ~12% slower with transformers' model loaded beside it). Also: kvserve's memory
(EngineStats at the end of its process), the batch-1 memory-bandwidth roofline, a greedy
token-equality check between the engines, and per run the CPU used by other processes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import torch

WORKLOADS = ("decode", "prefill", "batch16", "batch64")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"  # ../shared/data/
DECODE_LEN = 16  # batch-1 decode prompt: the first tokens of WikiText-2
PREFILL_LEN = 1000
BATCH_PROMPT_LENS = (32, 256)
NUM_MATCH_TOKENS = 32
CORPUS_CHARS = 400_000  # ~90k tokens: plenty of distinct slices for every workload
MIB = 1 << 20
T = TypeVar("T")
QUIET_WAIT_S = 0.0  # --wait-quiet: the longest wait for an idle CPU before each measured run


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- results


@dataclass
class DecodeRun:
    """One batch-1 generation: the tokens and when they came."""

    token_ids: list[int]
    ttft_s: float
    decode_s: float  # first generated token -> last generated token

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token."""
        return (len(self.token_ids) - 1) / self.decode_s


@dataclass
class BatchRun:
    """One concurrent run: how many real tokens came out in how long, and latency percentiles."""

    num_requests: int
    num_prompt_tokens: int
    num_generated_tokens: int
    wall_s: float
    ttft_p50_s: float | None
    tpot_p50_s: float | None
    e2e_p50_s: float | None = None
    num_preemptions: int | None = None

    @property
    def tokens_per_s(self) -> float:
        """Aggregate generation throughput."""
        return self.num_generated_tokens / self.wall_s


class Engine(Protocol):
    """What a benchmarked engine offers; kvserve and HF implement it the same way."""

    name: str

    def decode(self, prompt: list[int], num_new_tokens: int) -> DecodeRun:
        """Greedy batch-1 generation of exactly `num_new_tokens` tokens."""
        ...

    def prefill(self, prompt: list[int]) -> float:
        """Wall seconds to generate one token after `prompt`."""
        ...

    def batch(self, prompts: list[list[int]], num_new_tokens: int) -> BatchRun:
        """Greedy generation of `num_new_tokens` for every prompt at once."""
        ...


# ---------------------------------------------------------------------------- kvserve


class KvserveEngine:
    """kvserve's offline `LLM`, with the bundled model."""

    name = "kvserve"

    def __init__(self, args: argparse.Namespace) -> None:
        from kvserve import LLM

        self.llm = LLM(model=None, show_progress=False, kv_cache_memory=args.kv_cache_memory,
                       max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       num_threads=args.threads, **dict(_option(text) for text in args.kvserve_option or ()))

    def _params(self, num_new_tokens: int) -> Any:
        from kvserve import SamplingParams

        return SamplingParams(temperature=0, max_tokens=num_new_tokens, ignore_eos=True)

    def decode(self, prompt: list[int], num_new_tokens: int) -> DecodeRun:
        """Greedy batch-1 generation; timings from the request's metrics."""
        out = self.llm.generate([{"prompt_token_ids": prompt}], self._params(num_new_tokens),
                                use_tqdm=False)[0]
        m = out.metrics
        return DecodeRun(list(out.outputs[0].token_ids), m.time_to_first_token,
                         m.last_token_time - m.first_token_time)

    def prefill(self, prompt: list[int]) -> float:
        """Wall seconds of `generate` with max_tokens=1."""
        start = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": prompt}], self._params(1), use_tqdm=False)
        return time.perf_counter() - start

    def batch(self, prompts: list[list[int]], num_new_tokens: int) -> BatchRun:
        """All requests in one `generate` call: the engine batches them continuously."""
        preemptions_before = self.llm.stats().num_preemptions
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 self._params(num_new_tokens), use_tqdm=False)
        wall = time.perf_counter() - start
        return BatchRun(
            num_requests=len(prompts),
            num_prompt_tokens=sum(map(len, prompts)),
            num_generated_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
            wall_s=wall,
            ttft_p50_s=_median([o.metrics.time_to_first_token for o in outs]),
            tpot_p50_s=_median([o.metrics.time_per_output_token for o in outs]),
            e2e_p50_s=_median([o.metrics.e2e_latency for o in outs]),
            num_preemptions=self.llm.stats().num_preemptions - preemptions_before,
        )

    def memory(self) -> dict[str, int]:
        """The engine's own memory numbers."""
        stats = self.llm.stats()
        packed = self.llm.engine.runner.packed_weight_bytes  # oneDNN's copies: held, but not read by batch-1 decode
        return {"model_bytes": stats.model_bytes, "weight_bytes": stats.model_bytes - packed,
                "kv_cache_bytes": stats.kv_cache_bytes,
                "kv_blocks_total": stats.kv_blocks_total, "peak_rss_bytes": stats.peak_rss_bytes}


# ---------------------------------------------------------------------------- transformers


class TimestampStreamer:
    """A `generate` streamer that only records when each put() happens (the first is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        """Record the time a token (or, first, the prompt) was handed over."""
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


class HfEngine:
    """transformers `AutoModelForCausalLM.generate` on the same GGUF, dequantized to float32."""

    name = "transformers"

    def __init__(self, model_path: pathlib.Path, pad_token_id: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=torch.float32).eval()
        self.pad_token_id = pad_token_id

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  num_new_tokens: int, streamer: TimestampStreamer | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens,
                pad_token_id=self.pad_token_id, streamer=streamer,
                temperature=None, top_p=None, top_k=None)

    def decode(self, prompt: list[int], num_new_tokens: int) -> DecodeRun:
        """Greedy batch-1 generation; timings from streamer timestamps."""
        ids = torch.tensor([prompt])
        streamer = TimestampStreamer()
        start = time.perf_counter()
        out = self._generate(ids, torch.ones_like(ids), num_new_tokens, streamer)
        token_times = streamer.times[1:]  # times[0]: the prompt
        return DecodeRun(out[0, len(prompt):].tolist(), token_times[0] - start,
                         token_times[-1] - token_times[0])

    def prefill(self, prompt: list[int]) -> float:
        """Wall seconds of `generate` with max_new_tokens=1."""
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        self._generate(ids, torch.ones_like(ids), 1)
        return time.perf_counter() - start

    def batch(self, prompts: list[list[int]], num_new_tokens: int) -> BatchRun:
        """One static left-padded batch with an attention mask; min_new_tokens forbids EOS."""
        ids, mask = left_pad(prompts, self.pad_token_id)
        streamer = TimestampStreamer()
        start = time.perf_counter()
        out = self._generate(ids, mask, num_new_tokens, streamer)
        wall = time.perf_counter() - start
        num_new = out.shape[1] - ids.shape[1]  # every row has exactly this many real tokens
        token_times = streamer.times[1:]
        return BatchRun(
            num_requests=len(prompts),
            num_prompt_tokens=sum(map(len, prompts)),
            num_generated_tokens=num_new * len(prompts),
            wall_s=wall,
            # A static batch: every request sees the same first-token time and token gaps.
            ttft_p50_s=token_times[0] - start,
            tpot_p50_s=(token_times[-1] - token_times[0]) / max(num_new - 1, 1),
            e2e_p50_s=wall,
        )


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids [B, max_len] and the attention mask [B, max_len] (1 = real token)."""
    max_len = max(map(len, prompts))
    ids = torch.full((len(prompts), max_len), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, max_len - len(prompt):] = torch.tensor(prompt)
        mask[row, max_len - len(prompt):] = 1
    return ids, mask


# ---------------------------------------------------------------------------- prompts


@dataclass
class Prompts:
    """Every prompt of the run, shared by both engines."""

    decode: list[int]
    prefill: list[list[int]]  # [0] is the warm-up, then one fresh slice per repeat
    batch_warmup: list[list[int]]
    # batch size -> one prompt set per measured run: a repeat of the same prompts would hit
    # kvserve's prefix cache, which transformers cannot do.
    batches: dict[int, list[list[list[int]]]]


def build_prompts(tokenizer: Any, num_repeats: int, batch_sizes: Sequence[int], batch_repeats: int) -> Prompts:
    """Tokenize WikiText-2 once and cut every prompt out of it (seeded)."""
    corpus = load_corpus(tokenizer)
    rng = random.Random(0)
    # Plain article text, not a chat turn: greedy decoding stays far from EOS, which matters
    # because transformers' min_new_tokens masks EOS while kvserve's ignore_eos only keeps going.
    decode = corpus[:DECODE_LEN]
    prefill_text = corpus[DECODE_LEN:]
    prefill = [prefill_text[i * PREFILL_LEN:(i + 1) * PREFILL_LEN] for i in range(num_repeats + 1)]
    rest = prefill_text[len(prefill) * PREFILL_LEN:]
    return Prompts(
        decode=decode,
        prefill=prefill,
        batch_warmup=random_slices(rest, 4, BATCH_PROMPT_LENS, rng),
        batches={size: [random_slices(rest, size, BATCH_PROMPT_LENS, rng) for _ in range(batch_repeats)]
                 for size in batch_sizes},
    )


def load_corpus(tokenizer: Any) -> list[int]:
    """Token ids of the start of WikiText-2's test split."""
    if not DATA_FILE.is_file():
        raise SystemExit(f"benchmark data not found: {DATA_FILE}")
    text = DATA_FILE.read_text(encoding="utf-8")[:CORPUS_CHARS]
    return tokenizer.encode(text, add_special_tokens=False)


def random_slices(corpus: list[int], count: int, lengths: tuple[int, int],
                  rng: random.Random) -> list[list[int]]:
    """`count` slices of `corpus` with lengths uniform in `lengths` (inclusive), random offsets."""
    slices = []
    for _ in range(count):
        length = rng.randint(*lengths)
        start = rng.randrange(len(corpus) - length)
        slices.append(corpus[start:start + length])
    return slices


# ---------------------------------------------------------------------------- measurements


class CpuMeter:
    """How many cores other processes kept busy since this was made (the noise on a shared box)."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), time.process_time(), _busy_cpu_s())

    def other_cores(self) -> float | None:
        """Mean number of cores busy outside this process; None where /proc/stat is missing."""
        wall0, own0, busy0 = self.start
        busy = _busy_cpu_s()
        if busy is None or busy0 is None:
            return None
        own = time.process_time() - own0
        return round(max(0.0, (busy - busy0 - own) / (time.perf_counter() - wall0)), 2)


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat)."""
    try:
        fields = [int(f) for f in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait_s: float, threshold: float = 0.2, sample_s: float = 2.0) -> None:
    """Sleep, at most `max_wait_s`, until other processes keep fewer than `threshold` cores busy."""
    start = time.monotonic()
    other: float | None = None
    while time.monotonic() - start < max_wait_s:
        meter = CpuMeter()
        time.sleep(sample_s)
        other = meter.other_cores()
        if other is None or other < threshold:
            break
    waited = time.monotonic() - start
    if waited > 2 * sample_s:
        log(f"waited {waited:.0f} s for a quiet CPU (other processes' cores now {other})")


def measure(run: Callable[[], T]) -> tuple[T, float | None]:
    """`run()` once, after waiting for a quiet CPU if asked; also the other processes' cores during it."""
    wait_for_quiet(QUIET_WAIT_S)
    meter = CpuMeter()
    result = run()
    return result, meter.other_cores()


def best_of(engine: str, workload: str, rates: list[float], noise: list[float | None]
            ) -> dict[str, Any]:
    """The best rate of the runs, every run's rate, and the noise during each."""
    log(f"{engine} {workload}: {max(rates):.1f} tok/s (runs {_fmt(rates)}; "
        f"other processes' cores {noise})")
    return {"tokens_per_s": max(rates), "runs_tokens_per_s": rates, "runs_other_cores": noise}


def run_decode(engine: Engine, prompt: list[int], num_new_tokens: int) -> tuple[dict[str, Any], list[int]]:
    """Warm up, then one decode run; its rate and details, and its tokens."""
    engine.decode(prompt, min(num_new_tokens, 16))
    run, noise = measure(lambda: engine.decode(prompt, num_new_tokens))
    return {"tokens_per_s": run.tokens_per_s, "other_cores": noise, "ttft_s": run.ttft_s,
            "num_prompt_tokens": len(prompt), "num_new_tokens": len(run.token_ids)}, run.token_ids


def run_prefill(engine: Engine, warmup: list[int], prompt: list[int]) -> dict[str, Any]:
    """Warm up on one prompt, then time one prefill of a fresh one."""
    engine.prefill(warmup)
    seconds, noise = measure(lambda: engine.prefill(prompt))
    return {"tokens_per_s": len(prompt) / seconds, "other_cores": noise, "best_s": seconds,
            "num_prompt_tokens": len(prompt)}


def run_batch(engine: Engine, warmup: list[list[int]], prompts: list[list[int]], num_new_tokens: int
              ) -> dict[str, Any]:
    """A small warm-up batch, then one run over a fresh prompt set."""
    engine.batch(warmup, 8)
    run, noise = measure(lambda: engine.batch(prompts, num_new_tokens))
    details = {k: v for k, v in asdict(run).items() if v is not None}
    return {"tokens_per_s": run.tokens_per_s, "other_cores": noise, **details}


def measure_read_bandwidth(num_bytes: int = 512 * MIB, num_repeats: int = 5) -> float:
    """Best-of-N bytes/s of `.sum()` over a float32 tensor far larger than the caches."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(num_repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def roofline(weight_bytes: int, bandwidth: float, decode: dict[str, Any] | None
             ) -> dict[str, Any]:
    """Batch-1 decode reads every weight once per token: at most bandwidth / weight_bytes tok/s."""
    max_rate = bandwidth / weight_bytes
    result: dict[str, Any] = {"read_bandwidth_gb_s": bandwidth / 1e9,
                              "bandwidth_method": "torch float32 .sum() over 512 MiB, best of 5",
                              "weight_bytes": weight_bytes, "max_decode_tokens_per_s": max_rate}
    if decode is not None:
        result["kvserve_fraction"] = decode["tokens_per_s"] / max_rate
    return result


# ---------------------------------------------------------------------------- main


def machine_info(threads: int) -> dict[str, Any]:
    """Where and when this ran."""
    import transformers

    import kvserve

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvserve": getattr(kvserve, "__version__", "unknown"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_1_5_15": list(os.getloadavg()),  # other processes on the CPU make numbers noisy
    }


def method(args: argparse.Namespace) -> dict[str, str]:
    """How each number was taken, so that the JSON stands on its own."""
    return {
        "dtype": "float32 weights (GGUF dequantized) for both engines",
        "decode": f"best of {args.repeats} runs after a warm-up; rate = (new tokens - 1) / time "
                  "from first to last generated token (kvserve: request metrics; transformers: "
                  "timestamps of a generate() streamer's put calls)",
        "prefill": f"best of {args.repeats} runs after a warm-up, each on a fresh "
                   f"{PREFILL_LEN}-token WikiText-2 slice; wall time of generating 1 token",
        "batch": f"best of {args.batch_repeats} run(s) after a 4-request x 8-token warm-up, each run "
                 "on a fresh prompt set (no prefix-cache hits); prompts seeded, lengths uniform in "
                 "[32, 256] from WikiText-2; kvserve: one "
                 "generate() call (continuous batching); transformers: one left-padded static "
                 "batch with min_new_tokens = max_new_tokens; throughput = generated tokens / "
                 "wall time; transformers TTFT/TPOT are the batch's (same for every row)",
        "noise": "runs_other_cores: mean cores kept busy by other processes during each run "
                 "(/proc/stat busy time minus this process's CPU time, over wall time); the "
                 "2-core machine is shared, and a run with other_cores near 1 is several times "
                 "slower (OpenMP threads wait on a descheduled sibling)",
        "order": "rounds: round i runs kvserve alone in a fresh process, then transformers in another; each "
                 "warms up and measures run i of every workload (decode/prefill: rounds < repeats; batches: "
                 "rounds < batch_repeats)",
        "memory": "kvserve_memory: EngineStats at the end of the last kvserve process (peak RSS of kvserve alone)",
        "sanity": f"tokens_match: kvserve's first {NUM_MATCH_TOKENS} greedy decode tokens equal "
                  "transformers'",
    }


def parse_only(values: list[str] | None) -> list[str]:
    """`--only a,b --only c` -> ["a", "b", "c"], validated; nothing given means all."""
    if not values:
        return list(WORKLOADS)
    chosen = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--only: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    return [w for w in WORKLOADS if w in chosen]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-hf", action="store_true", help="only benchmark kvserve")
    parser.add_argument("--only", action="append", metavar="W",
                        help=f"workloads to run, repeatable or comma list: {','.join(WORKLOADS)}")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both engines")
    # 1 GiB: about what transformers' static batch of 64 holds (64 x 384 positions x 46 KB = 1.1 GB).
    parser.add_argument("--kv-cache-memory", type=int, default=1024 * MIB,
                        help="kvserve KV-cache bytes")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="kvserve max_num_seqs")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="kvserve max_num_batched_tokens (token budget of a step)")
    parser.add_argument("--kvserve-option", action="append", metavar="NAME=VALUE",
                        help="an extra kvserve engine option, e.g. quantization=none or cpu_fused_decode=false "
                             "(repeatable; the GGUF default is the file's 4-bit blocks, transformers dequantizes)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs, decode/prefill")
    parser.add_argument("--batch-repeats", type=int, default=2, help="measured runs, batches")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each measured run, wait up to this long for other "
                             "processes to leave the CPU (shared machines)")
    # Internal: how the parent starts each round's child process.
    parser.add_argument("--engine", choices=["kvserve", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = parse_only(args.only)
    if args.new_tokens < 2 or args.repeats < 1 or args.batch_repeats < 1:
        raise SystemExit("--new-tokens must be >= 2, --repeats and --batch-repeats >= 1")
    return args


def compare(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """kvserve / transformers throughput ratio per workload."""
    kv, hf = results.get("kvserve", {}), results.get("transformers", {})
    return {name: kv[name]["tokens_per_s"] / hf[name]["tokens_per_s"]
            for name in kv if name in hf}


def _option(text: str) -> tuple[str, Any]:
    """'name=value' -> (name, value) with true/false and numbers converted."""
    name, _, value = text.partition("=")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return name, lowered == "true"
    try:
        return name, int(value)
    except ValueError:
        return name, value


def main(argv: list[str] | None = None) -> None:
    """Rounds of one process per engine, alternating; print the JSON report (a child prints its round)."""
    global QUIET_WAIT_S
    args = parse_args(argv)
    QUIET_WAIT_S = args.wait_quiet
    torch.set_num_threads(args.threads)
    if args.engine:
        run_round(args)
    else:
        run_rounds(args, argv if argv is not None else sys.argv[1:])


def engine_tokenizer() -> Any:
    """The bundled model's tokenizer, without loading weights (both engines' prompts come from it)."""
    from kvserve.loader.weights import open_model

    return open_model(None).load_tokenizer()


def run_round(args: argparse.Namespace) -> None:
    """Child: one engine, round `args.round`: every workload's warm-up and its run with this round's prompts."""
    import json

    from kvserve.loader.weights import resolve_model_path

    tokenizer = engine_tokenizer()
    batch_sizes = [int(w.removeprefix("batch")) for w in args.only if w.startswith("batch")]
    prompts = build_prompts(tokenizer, args.repeats, batch_sizes, args.batch_repeats)
    if args.engine == "kvserve":
        engine: Engine = KvserveEngine(args)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        engine = HfEngine(resolve_model_path(None), pad)
    r = args.round
    results: dict[str, Any] = {}
    decode_tokens = None
    if r < args.repeats and "decode" in args.only:
        results["decode"], decode_tokens = run_decode(engine, prompts.decode, args.new_tokens)
    if r < args.repeats and "prefill" in args.only:
        results["prefill"] = run_prefill(engine, prompts.prefill[0], prompts.prefill[1 + r])
    if r < args.batch_repeats:
        for size, prompt_sets in prompts.batches.items():
            results[f"batch{size}"] = run_batch(engine, prompts.batch_warmup, prompt_sets[r], args.new_tokens)
    for workload, result in results.items():
        log(f"{engine.name} {workload}, round {r}: {result['tokens_per_s']:.1f} tok/s")
    out = {"results": results, "decode_tokens": decode_tokens}
    if isinstance(engine, KvserveEngine):
        out["memory"] = engine.memory()
    json.dump(out, sys.stdout)


def run_rounds(args: argparse.Namespace, argv: list[str]) -> None:
    """Parent: round r runs kvserve in a fresh process, then transformers in another; merge and report."""
    import json
    import subprocess

    from kvserve.loader.weights import resolve_model_path

    machine = machine_info(args.threads)  # date and load average at the start
    model_path = resolve_model_path(None)
    log(f"workloads {args.only}; model {model_path.name}; {args.threads} threads")
    names = ["kvserve"] + ([] if args.skip_hf else ["transformers"])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in names}
    decode_tokens: dict[str, list[int]] = {}
    memory: dict[str, Any] = {}
    for r in range(max(args.repeats, args.batch_repeats)):
        for name in names:
            child = subprocess.run([sys.executable, __file__, *argv, "--engine", name, "--round", str(r)],
                                   stdout=subprocess.PIPE, check=True, text=True)
            out = json.loads(child.stdout)
            for workload, result in out["results"].items():
                runs[name].setdefault(workload, []).append(result)
            if out["decode_tokens"] is not None:
                decode_tokens.setdefault(name, out["decode_tokens"])
            memory = out.get("memory", memory)
    results = {name: {w: merge_runs(name, w, rs) for w, rs in per.items()} for name, per in runs.items()}
    meter = CpuMeter()
    bandwidth = measure_read_bandwidth()
    bandwidth_noise = meter.other_cores()
    log(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s (other processes' cores {bandwidth_noise})")

    report: dict[str, Any] = {"machine": machine, "method": method(args), "config": _config(args, model_path)}
    if not args.skip_hf:
        if len(decode_tokens) == 2:
            report["tokens_match"], report["tokens_match_detail"] = _tokens_match(
                decode_tokens["kvserve"], decode_tokens["transformers"], engine_tokenizer().eos_token_id)
        report["kvserve_vs_transformers"] = compare(results)
    report["results"] = results
    report["kvserve_memory"] = memory
    report["roofline"] = roofline(memory["weight_bytes"], bandwidth, results["kvserve"].get("decode"))
    report["roofline"]["bandwidth_other_cores"] = bandwidth_noise
    json.dump(report, sys.stdout, indent=2)
    print()


def merge_runs(engine: str, workload: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One workload's rounds (one run each) -> the best run's details plus every run's rate and noise."""
    best = max(runs, key=lambda r: r["tokens_per_s"])
    details = {k: v for k, v in best.items() if k not in ("tokens_per_s", "other_cores")}
    return {**best_of(engine, workload, [r["tokens_per_s"] for r in runs], [r["other_cores"] for r in runs]),
            **details}


def _config(args: argparse.Namespace, model_path: pathlib.Path) -> dict[str, Any]:
    return {"model": model_path.name, "workloads": args.only, "new_tokens": args.new_tokens,
            "threads": args.threads, "kv_cache_memory": args.kv_cache_memory,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "repeats": args.repeats, "batch_repeats": args.batch_repeats,
            "wait_quiet_s": args.wait_quiet,
            "batch_prompt_lens": list(BATCH_PROMPT_LENS), "prefill_prompt_len": PREFILL_LEN}


def _tokens_match(kv_tokens: list[int], hf_tokens: list[int], eos_token_id: int | None
                  ) -> tuple[bool, dict[str, Any]]:
    """Whether the first NUM_MATCH_TOKENS greedy tokens agree, and where they first differ."""
    a, b = kv_tokens[:NUM_MATCH_TOKENS], hf_tokens[:NUM_MATCH_TOKENS]
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    detail: dict[str, Any] = {"num_compared": min(len(a), len(b)), "first_mismatch": first_diff}
    if first_diff is not None:
        # transformers' min_new_tokens masks EOS; kvserve's ignore_eos lets it be generated.
        detail["kvserve_chose_eos"] = a[first_diff] == eos_token_id
        detail["kvserve"], detail["transformers"] = a, b
    return a == b, detail


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
