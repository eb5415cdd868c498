"""Command line: `kvserve generate | chat | serve | bench serve | kv-memory | quantize`; flags are derived from the
config dataclasses."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import sys
import time
import types
import typing
from typing import Any

from kvserve.config import EngineConfig, option_sections, sub_configs
from kvserve.distributed.executor import run_worker, torchrun_rank
from kvserve.kv.kv_memory_cli import add_kv_memory_command
from kvserve.llm import LLM
from kvserve.outputs import RequestOutput
from kvserve.quantize.command import add_quantize_command
from kvserve.sampling_params import SamplingParams
from kvserve.server.config import ServerConfig


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per engine option, in one argument group per EngineConfig section, typed and documented."""
    for section, sub_config in sub_configs().items():
        add_dataclass_flags(parser, sub_config, f"engine: {section}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One `--flag` per field of a config dataclass, typed and documented from it, its default shown."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        helptext = f.metadata.get("help", "")
        if f.default is not None:  # an unset default is explained by the help text
            helptext += f" (default: {f.default})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=helptext)
        else:
            group.add_argument(flag, type=kind, default=f.default, help=helptext)


def _base_type(hint: Any) -> type:
    """`int | None` -> int."""
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The flat engine options (EngineConfig.from_kwargs' keyword arguments) found in parsed flags."""
    return {name: getattr(args, name) for name in option_sections()}


def dataclass_kwargs(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """A config dataclass's keyword arguments found in parsed flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The most used SamplingParams as flags."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--sampling-seed", type=int, default=None,
                       help="seed of this request's random sampling")
    group.add_argument("--verbose", action="store_true", help="print latency and memory metrics")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the parsed sampling flags."""
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)


def stream_to_stdout(outputs: typing.Iterator[RequestOutput],
                     stop: typing.Callable[[], bool] = lambda: False) -> RequestOutput | None:
    """Print deltas as they come, to the end or until `stop()` says so (the stream is then closed: LLM.stream
    aborts its request); returns the last output printed."""
    last = None
    for last in outputs:
        sys.stdout.write(last.outputs[0].delta_text)
        sys.stdout.flush()
        if stop():
            break
    close = getattr(outputs, "close", None)
    if close is not None:
        close()
    sys.stdout.write("\n")
    return last


def print_metrics(llm: LLM, output: RequestOutput | None, wall: float) -> None:
    """Per-request latencies and engine memory, to stderr."""
    stats = llm.stats()
    lines = []
    if output is not None:
        m = output.metrics
        tpot = m.time_per_output_token
        lines += [f"prompt tokens: {m.num_prompt_tokens}, generated: {m.num_generation_tokens}",
                  f"TTFT: {m.time_to_first_token * 1000:.1f} ms" if m.time_to_first_token else "",
                  f"TPOT: {tpot * 1000:.1f} ms ({1 / tpot:.1f} tokens/s)" if tpot else "",
                  f"end to end: {wall:.2f} s"]
    lines += [f"KV blocks in use: {stats.kv_blocks_used} / {stats.kv_blocks_total}",
              f"memory: model {stats.model_bytes / 2**20:.0f} MiB + KV cache "
              f"{stats.kv_cache_bytes / 2**20:.0f} MiB; peak RSS {stats.peak_rss_bytes / 2**20:.0f} MiB"]
    spec = stats.spec_decode
    if spec.num_drafts:
        lines.append(f"speculative decoding: {spec.num_accepted_tokens} of {spec.num_draft_tokens} drafts accepted "
                     f"({spec.acceptance_rate:.0%}), {spec.mean_acceptance_length:.2f} tokens per verify step")
    print("\n".join(line for line in lines if line), file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete one prompt, streaming the text."""
    params = sampling_params(args)  # bad flags fail before the model loads
    llm = LLM(**engine_kwargs(args))
    start = time.monotonic()
    output = stream_to_stdout(llm.stream(args.prompt, params))
    if args.verbose:
        print_metrics(llm, output, time.monotonic() - start)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat with the model: one `--message`, or an interactive session (kvserve/chat.py)."""
    from kvserve.chat import ChatSession, run_interactive

    params = sampling_params(args)  # bad flags fail before the model loads
    llm = LLM(**engine_kwargs(args))
    on_answer = (lambda output, wall: print_metrics(llm, output, wall)) if args.verbose else None
    session = ChatSession(llm, params, args.system, on_answer)
    if args.message:
        print(f"> {args.message}")
        session.answer(args.message)
    else:
        run_interactive(session)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the OpenAI-compatible HTTP API until interrupted."""
    from kvserve.server.api_server import serve

    server_kwargs = dataclass_kwargs(args, ServerConfig)
    if server_kwargs["api_key"] is None:
        server_kwargs["api_key"] = os.environ.get("KVSERVE_API_KEY") or None
    serve(EngineConfig.from_kwargs(**engine_kwargs(args)), ServerConfig(**server_kwargs))


def cmd_bench_serve(args: argparse.Namespace) -> None:
    """Benchmark a running server; prints JSON to stdout."""
    from kvserve.bench.serve import BenchConfig, run_benchmark

    config = BenchConfig(url=args.url.rstrip("/"), model=args.model, num_requests=args.num_requests,
                         request_rate=args.request_rate, concurrency=args.concurrency,
                         input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                         seed=args.seed, api_key=args.api_key or os.environ.get("KVSERVE_API_KEY"))
    summary, results = asyncio.run(run_benchmark(config, show_progress=True))
    if args.plot:
        from kvserve.bench.plot import plot_latencies

        rate = "all at once" if math.isinf(config.request_rate) else f"{config.request_rate:g} req/s"
        plot_latencies(results, args.plot, f"kvserve bench serve: {config.num_requests} requests, "
                       f"concurrency {config.concurrency or 'unlimited'}, {rate}")
        summary["plot"] = args.plot
    print(json.dumps(summary, indent=2))


def _add_bench_serve(bench: argparse._SubParsersAction) -> None:
    serve_bench = bench.add_parser("serve", help="stream requests to a running server: TTFT, TPOT, ITL, "
                                   "throughput as JSON")
    serve_bench.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    serve_bench.add_argument("--model", default=None, help="model name (default: the server's first)")
    serve_bench.add_argument("--num-requests", type=int, default=64)
    serve_bench.add_argument("--request-rate", type=float, default=math.inf,
                             help="requests per second, Poisson arrivals (default: inf, all at once)")
    serve_bench.add_argument("--concurrency", type=int, default=None, help="most requests in flight")
    serve_bench.add_argument("--input-len", type=int, default=128, help="mean prompt length (words ~ tokens)")
    serve_bench.add_argument("--output-len", type=int, default=64, help="mean max_tokens (EOS ignored)")
    serve_bench.add_argument("--range-ratio", type=float, default=0.5,
                             help="lengths drawn uniformly from len * [1 - r, 1 + r]")
    serve_bench.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    serve_bench.add_argument("--api-key", default=None, help="default: $KVSERVE_API_KEY")
    serve_bench.add_argument("--plot", default=None, metavar="PNG", help="write TTFT / TPOT histograms here")
    serve_bench.set_defaults(func=cmd_bench_serve)


def build_parser() -> argparse.ArgumentParser:
    """The `kvserve` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="complete a prompt, streaming the answer")
    generate.add_argument("prompt")
    generate.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="chat with the model (interactive unless --message)",
                          description="Chat with the model. At the prompt: /reset forgets the conversation, /help, "
                                      "/exit or Ctrl-D quits; Ctrl-C stops an answer, and quits at the prompt.")
    chat.add_argument("--message", help="send one message and exit")
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=cmd_chat)
    for command in (generate, chat):
        add_engine_flags(command)
        add_sampling_flags(command)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_dataclass_flags(serve, ServerConfig, "server")
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks")
    _add_bench_serve(bench.add_subparsers(dest="bench_command", required=True))
    add_kv_memory_command(sub)
    add_quantize_command(sub)
    return parser


def show_info_lines() -> None:
    """kvserve's INFO lines (the engine's ready line, the server's draining) on stderr as `kvserve: ...`; other
    libraries stay at their own levels. Once per process."""
    package = logging.getLogger("kvserve")
    if not any(isinstance(handler, _InfoHandler) for handler in package.handlers):
        handler = _InfoHandler()
        handler.setFormatter(logging.Formatter("kvserve: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


class _InfoHandler(logging.StreamHandler):
    """The CLI's stderr handler (a class of its own, so that it is added once)."""


def _is_torchrun_worker(args: argparse.Namespace) -> bool:
    """Whether this is a torchrun rank other than 0 of a command that builds an engine."""
    rank = torchrun_rank()
    return bool(rank) and args.func in (cmd_serve, cmd_generate, cmd_chat)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kvserve` console script."""
    args = build_parser().parse_args(argv)
    show_info_lines()
    try:
        if _is_torchrun_worker(args):  # torchrun started every rank with this command: rank 0 runs it
            run_worker(EngineConfig.from_kwargs(**engine_kwargs(args)), torchrun_rank())
            return
        args.func(args)
    except ValueError as error:
        sys.exit(f"kvserve: error: {error}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
