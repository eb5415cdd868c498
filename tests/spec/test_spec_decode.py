"""Speculative decoding end to end: greedy output identical with and without drafts (bundled model on every
path, tiny MHA / GQA / MQA / MLA models), the same sampling distribution, and every block freed on abort."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Any

import pytest
import torch
import transformers

from kvserve import LLM, SamplingParams
from kvserve.engine.scheduler import SpecDecodeStats
from kvserve.runner import model_runner

NGRAM = {"speculative_method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "speculative_disable_by_batch_size": None}  # drafts at any batch size
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
COPY_TEXT = ("def total(prices, tax):\n    subtotal = sum(prices)\n    return subtotal * (1 + tax)\n\n"
             "def average(prices):\n    return sum(prices) / len(prices)\n")


def generate_ids(llm: LLM, prompts: list[Any], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def bundled_prompts() -> list[Any]:
    """A copy task (the drafts mostly hit), two open prompts (they mostly miss) and a repeated one that shares a
    cached prefix with the copy task."""
    copy = f"Copy this code exactly:\n{COPY_TEXT}\nCopy:\n"
    return [copy, "The capital of France is", "Once upon a time, in a small village by the sea,",
            copy + "def total"]


@pytest.fixture(scope="module")
def bundled_reference(bundled_prompts) -> list[list[int]]:
    """The bundled model's greedy tokens without drafts, on its defaults."""
    return generate_ids(LLM(show_progress=False), bundled_prompts)


# 8 blocks of 16 float32 tokens: preemption is forced; a budget of 16 tokens chunks prompts beside verify steps.
TIGHT = {"kv_cache_memory": 8 * 16 * 30 * 2 * 3 * 64 * 4, "max_num_batched_tokens": 16}


@pytest.mark.parametrize("options", [{}, TIGHT])
def test_bundled_greedy_output_is_identical_with_drafts(options, bundled_prompts, bundled_reference):
    speculative = LLM(show_progress=False, **options, **NGRAM)  # GGUF-native weights, the fused decode step
    assert generate_ids(speculative, bundled_prompts) == bundled_reference
    stats = speculative.stats()
    assert 0 < stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens  # hits and misses
    assert stats.kv_blocks_used == 0
    assert (stats.num_preemptions > 0) == bool(options)


@pytest.mark.parametrize("options", [{"quantization": "none"}, {"kv_cache_dtype": "int8"}])
def test_bundled_greedy_output_is_identical_with_drafts_on_other_paths(options, bundled_prompts):
    """float32 weights verify on the modules; an int8 cache on its kernels (each against itself without drafts)."""
    plain = generate_ids(LLM(show_progress=False, **options), bundled_prompts)
    speculative = LLM(show_progress=False, **options, **NGRAM)
    assert generate_ids(speculative, bundled_prompts) == plain
    assert speculative.stats().spec_decode.num_accepted_tokens > 0


def save_tiny_model(path: pathlib.Path, config_name: str, vocab_size: int, **overrides: Any) -> str:
    """A tiny random transformers model (peaked logits: no greedy near-ties) saved with the bundled tokenizer."""
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.15, **overrides)
    torch.manual_seed(0)
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


@pytest.mark.parametrize(("case", "kv_cache_dtype"), [(case, "auto") for case in TINY] + [("gqa", "int8"),
                                                                                           ("gqa", "fp8")])
def test_tiny_models_greedy_output_is_identical_with_drafts(case, kv_cache_dtype, tmp_path, tokenizer):
    config_name, overrides = TINY[case]
    path = save_tiny_model(tmp_path, config_name, len(tokenizer), **overrides)
    tokenizer.save_pretrained(tmp_path)
    options = {"kv_cache_memory": 8 * 2**20, "max_num_batched_tokens": 32,  # chunked prompts beside verifies
               "kv_cache_dtype": kv_cache_dtype}
    plain = LLM(model=path, show_progress=False, **options)
    speculative = LLM(model=path, show_progress=False, **options, **NGRAM)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    assert generate_ids(speculative, TINY_PROMPTS, params) == generate_ids(plain, TINY_PROMPTS, params)
    assert speculative.stats().spec_decode.num_accepted_tokens > 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer.save_pretrained(path)
    return save_tiny_model(path, *TINY["gqa"][:1], len(tokenizer), **TINY["gqa"][1])


@pytest.fixture(scope="module")
def small_vocab_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> str:
    """A tiny Llama over 16 tokens: its samples repeat the prompt's n-grams often enough to accept drafts."""
    path = tmp_path_factory.mktemp("small-vocab-llama")
    tokenizer.save_pretrained(path)
    return save_tiny_model(path, *TINY["gqa"][:1], 16, **TINY["gqa"][1])


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


def test_sampling_distribution_is_the_same_with_drafts(small_vocab_llama):
    plain, _ = sequence_counts(small_vocab_llama, PARAMS, NUM_SAMPLES)
    speculative, stats = sequence_counts(small_vocab_llama, PARAMS, NUM_SAMPLES, **NGRAM)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both branches of the rule ran
    assert total_variation(plain, speculative) < MAX_TOTAL_VARIATION


def test_a_wrong_acceptance_rule_fails_the_distribution_test(small_vocab_llama, monkeypatch):
    plain, _ = sequence_counts(small_vocab_llama, PARAMS, NUM_SAMPLES)
    monkeypatch.setattr(model_runner, "num_accepted", lambda drafts, sampled: len(drafts))  # accept every draft
    wrong, _ = sequence_counts(small_vocab_llama, PARAMS, NUM_SAMPLES, **NGRAM)
    assert total_variation(plain, wrong) > MAX_TOTAL_VARIATION


def test_aborts_mid_verification_free_every_block(tiny_llama):
    llm = LLM(model=tiny_llama, show_progress=False, kv_cache_memory=8 * 2**20, **NGRAM)
    engine, scheduler = llm.engine, llm.engine.scheduler
    for index, prompt in enumerate(TINY_PROMPTS):
        engine.add_request(str(index), prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    while not any(request.draft_token_ids for request in scheduler.running):
        engine.step()
    scheduled = scheduler.schedule()  # blocks allocated for the drafts too
    assert scheduled.scheduled_spec_decode_tokens
    sampled = engine.runner.execute(scheduled)
    for index in range(len(TINY_PROMPTS)):  # the clients leave while the verify step runs
        engine.abort_request(str(index))
    scheduler.update(scheduled, sampled)
    engine.runner.execute(scheduler.schedule())  # the runner learns who finished
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.num_blocks
    assert not engine.has_unfinished_requests() and not engine.runner.input_batch.requests
