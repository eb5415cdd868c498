"""Command line: `kvserve generate | chat`; engine flags are derived from EngineConfig's fields."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
import typing
from typing import Any

from kvserve.config import EngineConfig
from kvserve.llm import LLM
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

DEFAULT_CHAT_PROMPT = "In three sentences, what is a KV cache and why does it make LLM inference fast?"


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per EngineConfig field, typed and documented from the dataclass."""
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        helptext = f.metadata.get("help", "")
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
    """The EngineConfig keyword arguments found in parsed flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}


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


def stream_to_stdout(outputs: typing.Iterable[RequestOutput]) -> RequestOutput | None:
    """Print deltas as they come; returns the final output."""
    last = None
    for last in outputs:
        sys.stdout.write(last.outputs[0].delta_text)
        sys.stdout.flush()
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
    print("\n".join(line for line in lines if line), file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete one prompt, streaming the text."""
    llm = LLM(**engine_kwargs(args))
    start = time.monotonic()
    output = stream_to_stdout(llm.stream(args.prompt, sampling_params(args)))
    if args.verbose:
        print_metrics(llm, output, time.monotonic() - start)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat with the model: one `--message`, or an interactive loop."""
    llm = LLM(**engine_kwargs(args))
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    pending = [args.message] if args.message else None
    while True:
        if pending is not None:
            if not pending:
                return
            user = pending.pop()
            print(f"> {user}")
        else:
            try:
                user = input("> ")
            except EOFError:
                return
            if user.strip() in ("", "/exit", "/quit"):
                return
        messages.append({"role": "user", "content": user})
        prompt = {"prompt_token_ids": llm.apply_chat_template(messages)}
        start = time.monotonic()
        output = stream_to_stdout(llm.stream(prompt, sampling_params(args)))
        if args.verbose:
            print_metrics(llm, output, time.monotonic() - start)
        messages.append({"role": "assistant", "content": output.outputs[0].text if output else ""})


def build_parser() -> argparse.ArgumentParser:
    """The `kvserve` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="complete a prompt, streaming the answer")
    generate.add_argument("prompt")
    generate.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="chat with the model (interactive unless --message)")
    chat.add_argument("--message", help="send one message and exit")
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=cmd_chat)
    for command in (generate, chat):
        add_engine_flags(command)
        add_sampling_flags(command)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kvserve` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:
        sys.exit(f"kvserve: error: {error}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
