"""What the speculative-decoding tests share: option sets, tiny random models, and the sampling-distribution
measure."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Any

import torch
import transformers

from kvserve import LLM, SamplingParams
from kvserve.engine.scheduler import SpecDecodeStats

NGRAM = {"speculative_method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "speculative_disable_by_batch_size": None}  # drafts at any batch size
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
COPY_TEXT = ("def total(prices, tax):\n    subtotal = sum(prices)\n    return subtotal * (1 + tax)\n\n"
             "def average(prices):\n    return sum(prices) / len(prices)\n")


def generate_ids(llm: LLM, prompts: list[Any], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# 8 blocks of 16 float32 tokens: preemption is forced; a budget of 16 tokens chunks prompts beside verify steps.
TIGHT = {"kv_cache_memory": 8 * 16 * 30 * 2 * 3 * 64 * 4, "max_num_batched_tokens": 16}


def save_tiny_model(path: pathlib.Path, config_name: str, vocab_size: int, seed: int = 0, **overrides: Any) -> str:
    """A tiny random transformers model (peaked logits: no greedy near-ties), its weights drawn from `seed`."""
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.15, **overrides)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


TINY = {
    "mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "gqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 1}),
    "mla": ("DeepseekV3Config", {"num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
                                 "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                 "v_head_dim": 24, "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1}),
}
# Repetitive prompts: the random models fall into loops, which is what n-gram drafts catch.
TINY_PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8] * 6}, {"prompt_token_ids": [300, 301, 302] * 3 + [9]},
                {"prompt_token_ids": list(range(100, 140))}]

def sequence_counts(model: str, params: SamplingParams, num_samples: int,
                    **options: Any) -> tuple[collections.Counter, SpecDecodeStats]:
    """How often each 4-token continuation of one repetitive prompt is sampled, one seed per sample; and the
    drafts' statistics."""
    llm = LLM(model=model, show_progress=False, max_num_seqs=256, kv_cache_memory=64 * 2**20, **options)
    prompts = [{"prompt_token_ids": [3, 4, 5, 6] * 4}] * num_samples
    seeded = [dataclasses.replace(params, seed=seed) for seed in range(num_samples)]
    outputs = llm.generate(prompts, seeded, use_tqdm=False)
    return collections.Counter(tuple(o.outputs[0].token_ids) for o in outputs), llm.stats().spec_decode


def total_variation(a: collections.Counter, b: collections.Counter) -> float:
    n_a, n_b = sum(a.values()), sum(b.values())
    return sum(abs(a[key] / n_a - b[key] / n_b) for key in a.keys() | b.keys()) / 2


PARAMS = SamplingParams(temperature=1.0, top_k=3, top_p=0.95, max_tokens=4, ignore_eos=True)
NUM_SAMPLES = 3000
# Two empirical distributions of NUM_SAMPLES draws from one law over the <= 81 sequences top_k=3 allows differ by
# a total variation of ~0.04 (0.05 measured at 1,500 samples); accepting every draft moved it to 0.38.
MAX_TOTAL_VARIATION = 0.1
