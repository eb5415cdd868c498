"""Speculative decoding: kvserve with n-gram drafts and with draft models against kvserve without, on the same
prompts, in one run.

Each configuration runs in a fresh process per round (rounds alternate the order), on the bundled
SmolLM2-135M-Instruct (its GGUF-native 4-bit weights unless `--option quantization=none`), greedy, so all produce
the same tokens (checked). Prints one JSON object to stdout; progress goes to stderr.

    .venv/bin/python benchmarks/bench_spec.py > /tmp/spec.json
    .venv/bin/python benchmarks/bench_spec.py --num-speculative-tokens 8 --prompt-lookup-max 3 --rounds 3
    .venv/bin/python benchmarks/bench_spec.py --option quantization=none   # a float32 target

Configurations: plain; ngram (prompt lookup); draft_4bit (the bundled file's GGUF-native 4-bit weights drafting,
gpt-fast's int4 self-draft: for a float32 target a cheaper copy of the same numbers, for the 4-bit target itself);
draft_layers{N} for each `--draft-num-layers N` (the 4-bit file's first N layers: a truncated copy).

Workloads, each prompt in the model's chat template, up to `--max-tokens` tokens (EOS ends a request):
- copy:  batch 1, "repeat this" over a code file and a quoted prose passage (WikiText-2): outputs repeat the
         prompt, what n-gram drafts catch (asked to repeat the passage "exactly" unquoted, the 135M model
         paraphrased it in 34 tokens instead; quoted and "word for word", it copies it);
- chat:  batch 1, open-ended questions: drafts rarely match; speculation must not cost;
- mixed16: 16 concurrent requests, the copy and chat prompts in turn, one `generate` call.
Batch-1 rate: (tokens - 1) / (first to last token), per prompt, summed over prompts; mixed16: tokens / wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from kvserve.loader.weights import bundled_model_path

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
CODE_FILE = REPO_ROOT / "kvserve" / "engine" / "stop.py"
CHAT_QUESTIONS = ["Write a short story about a robot who learns to paint.",
                  "Explain how a CPU cache works to a new programmer.",
                  "What are three good habits for staying healthy? Explain each."]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def passage() -> str:
    """About 200 words of WikiText-2 (a fixed place in it), or a stand-in paragraph when the data is absent."""
    if DATA_FILE.exists():
        words = DATA_FILE.read_text(encoding="utf-8").split()
        return " ".join(words[5000:5200])
    return " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 12)


def prompts() -> dict[str, list[str]]:
    """The workloads' user messages."""
    copy = [f"Repeat the following code exactly, with no comment:\n\n{CODE_FILE.read_text(encoding='utf-8')}",
            f"Repeat the following passage word for word:\n\n\"{passage()}\""]
    return {"copy": copy, "chat": CHAT_QUESTIONS}


def worker(options: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """One configuration in this process: every workload once after a warm-up; rates and tokens as JSON."""
    from kvserve import LLM, SamplingParams

    llm = LLM(show_progress=False, **options)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    messages = prompts()
    chats = {name: [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": text}])}
                    for text in texts] for name, texts in messages.items()}
    llm.generate(chats["chat"][:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    result: dict[str, Any] = {"tokens": {}}
    for name in ("copy", "chat"):
        num_tokens, seconds = 0, 0.0
        for index, prompt in enumerate(chats[name]):
            output = llm.generate([prompt], params, use_tqdm=False)[0]
            metrics = output.metrics
            num_tokens += len(output.outputs[0].token_ids) - 1
            seconds += metrics.last_token_time - metrics.first_token_time
            result["tokens"][f"{name}{index}"] = output.outputs[0].token_ids
        result[name] = {"decode_tok_s": num_tokens / seconds, "tokens": num_tokens}
    mixed = [prompt for pair in zip(chats["copy"] * 8, chats["chat"] * 8, strict=False) for prompt in pair][:16]
    start = time.perf_counter()
    outputs = llm.generate(mixed, params, use_tqdm=False)
    wall = time.perf_counter() - start
    result["mixed16"] = {"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outputs) / wall}
    spec = llm.stats().spec_decode
    result["spec_decode"] = {"num_drafts": spec.num_drafts, "num_draft_tokens": spec.num_draft_tokens,
                             "num_accepted_tokens": spec.num_accepted_tokens,
                             "acceptance_rate": round(spec.acceptance_rate, 3),
                             "mean_acceptance_length": round(spec.mean_acceptance_length, 3),
                             "accepted_per_position": spec.accepted_per_position}
    return result


def run_worker(options: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """`worker` in a fresh process (each configuration alone in its process)."""
    command = [sys.executable, __file__, "--worker", json.dumps(options), "--max-tokens", str(max_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"worker {options} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def parse_option(text: str) -> tuple[str, Any]:
    """`name=value` with value read as JSON where it parses (numbers, booleans), else as a string."""
    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=2)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--draft-num-layers", type=int, nargs="*", default=[8],
                        help="truncated-copy drafts to run: the bundled file's first N layers, for each N")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an engine option for both configurations (e.g. quantization=none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker), args.max_tokens)))
        return
    base = dict(parse_option(text) for text in args.option)
    configs = {"plain": base, "ngram": {**base, "speculative_method": "ngram",
                                        "num_speculative_tokens": args.num_speculative_tokens,
                                        "prompt_lookup_min": args.prompt_lookup_min,
                                        "prompt_lookup_max": args.prompt_lookup_max}}
    draft = {**base, "speculative_model": str(bundled_model_path()), "speculative_quantization": "gguf",
             "num_speculative_tokens": args.num_speculative_tokens}
    configs["draft_4bit"] = draft
    for num_layers in args.draft_num_layers:
        configs[f"draft_layers{num_layers}"] = {**draft, "speculative_num_layers": num_layers}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        order = list(configs) if round_index % 2 == 0 else list(reversed(configs))
        for name in order:
            log(f"round {round_index + 1}: {name} (load average {os.getloadavg()[0]:.2f})")
            runs[name].append(run_worker(configs[name], args.max_tokens))
    # Which configurations (a run of plain included) gave other greedy tokens than plain's first run, per workload.
    differing = {name: sorted({workload for run in rs for workload, tokens in run["tokens"].items()
                               if tokens != runs["plain"][0]["tokens"][workload]}) for name, rs in runs.items()}
    same_tokens = not any(differing.values())
    medians = {name: {"copy_decode_tok_s": statistics.median(r["copy"]["decode_tok_s"] for r in rs),
                      "chat_decode_tok_s": statistics.median(r["chat"]["decode_tok_s"] for r in rs),
                      "mixed16_output_tok_s": statistics.median(r["mixed16"]["output_tok_s"] for r in rs)}
               for name, rs in runs.items()}
    ratios = {name: {key: round(medians[name][key] / medians["plain"][key], 3) for key in medians["plain"]}
              for name in configs if name != "plain"}
    print(json.dumps({
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "configs": configs, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "greedy_tokens_identical": same_tokens,
        "greedy_tokens_differ": {name: workloads for name, workloads in differing.items() if workloads},
        "medians": {name: {k: round(v, 2) for k, v in m.items()} for name, m in medians.items()},
        "over_plain": ratios,
        "ngram_targets": {"copy >= 2.0": ratios["ngram"]["copy_decode_tok_s"] >= 2.0,
                          "chat >= 0.95": ratios["ngram"]["chat_decode_tok_s"] >= 0.95},
        "spec_decode": {name: runs[name][-1]["spec_decode"] for name in configs if name != "plain"},
        "load_average_at_end": os.getloadavg(),
    }, indent=2))

if __name__ == "__main__":
    main()
