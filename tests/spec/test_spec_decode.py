"""Speculative decoding end to end: greedy output identical with and without drafts (bundled model on every
path, tiny MHA / GQA / MQA / MLA models), the same sampling distribution, and every block freed on abort."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from spec_cases import (
    MAX_TOTAL_VARIATION,
    NGRAM,
    NUM_SAMPLES,
    PARAMS,
    TIGHT,
    TINY,
    TINY_PROMPTS,
    generate_ids,
    save_tiny_model,
    sequence_counts,
    total_variation,
)

from kvserve import LLM, SamplingParams, StructuredOutputsParams
from kvserve.runner import model_runner


@pytest.mark.parametrize("options", [{}, TIGHT])
def test_bundled_greedy_output_is_identical_with_drafts(options, bundled_prompts, bundled_reference):
    speculative = LLM(show_progress=False, **options, **NGRAM)  # GGUF-native weights, the fused decode step
    assert generate_ids(speculative, bundled_prompts) == bundled_reference
    stats = speculative.stats()
    assert 0 < stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens  # hits and misses
    assert stats.kv_blocks_used == 0
    assert (stats.num_preemptions > 0) == bool(options)


@pytest.mark.parametrize("options", [{"quantization": "none"}, {"cpu_gguf_int8_activations": True},
                                     {"cpu_gguf_int8_activations": True, "kv_cache_dtype": "int8"},
                                     {"kv_cache_dtype": "float16"}, {"kv_cache_dtype": "int8"},
                                     {"kv_cache_dtype": "int4"},
                                     {"kv_window": 48, "kv_sinks": 4}])
def test_bundled_greedy_output_is_identical_with_drafts_on_other_paths(options, bundled_prompts):
    """float32 weights and 8-bit activations (batch-invariant kernels) verify on the fused step (with an int8
    cache, on 8-bit queries too); int8 and int4 caches on their kernels (a float16 cache too; int4: no draft fills
    a block, which would be quantized with it); sinks + a window that slides during the output, evicting by the
    accepted tokens (each against itself without drafts)."""
    plain = generate_ids(LLM(show_progress=False, **options), bundled_prompts)
    speculative = LLM(show_progress=False, **options, **NGRAM)
    assert generate_ids(speculative, bundled_prompts) == plain
    assert speculative.stats().spec_decode.num_accepted_tokens > 0




@pytest.mark.parametrize(("case", "kv_cache_dtype"), [(case, "auto") for case in TINY] + [("gqa", "int8"),
                                                                                           ("gqa", "bfloat16"),
                                                                                           ("gqa", "fp8"),
                                                                                           ("gqa", "int4")])
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


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
def test_aborts_mid_verification_free_every_block(proposer, tiny_llama):
    options = NGRAM if proposer == "ngram" else {"speculative_model": tiny_llama, "num_speculative_tokens": 3,
                                                 "speculative_disable_by_batch_size": None}
    llm = LLM(model=tiny_llama, show_progress=False, kv_cache_memory=8 * 2**20, **options)
    engine, scheduler = llm.engine, llm.engine.scheduler
    for index, prompt in enumerate(TINY_PROMPTS):
        engine.add_request(str(index), prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    while not any(request.draft_token_ids for request in scheduler.running):
        engine.step()
    scheduled = scheduler.schedule()  # blocks allocated for the drafts too (and a draft model's lookahead)
    assert scheduled.scheduled_spec_decode_tokens
    sampled = engine.runner.execute(scheduled)
    for index in range(len(TINY_PROMPTS)):  # the clients leave while the verify step runs
        engine.abort_request(str(index))
    scheduler.update(scheduled, sampled)
    engine.runner.execute(scheduler.schedule())  # the runner learns who finished
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.num_blocks
    assert not engine.has_unfinished_requests() and not engine.runner.input_batch.requests


FRUIT = {"type": "object", "required": ["name", "price"],
         "properties": {"name": {"type": "string"}, "price": {"type": "number"}}}
FRUITS = {"type": "object", "required": ["items"],
          "properties": {"items": {"type": "array", "minItems": 3, "items": FRUIT}}}


def test_grammar_constrained_requests_verify_drafts_under_their_masks():
    """Each draft row is masked by the grammar after the drafts before it: the same greedy tokens, drafts accepted
    in the constrained requests, and sampled output that still validates."""
    constraints = [StructuredOutputsParams(json=FRUITS), StructuredOutputsParams(regex="(yes|no)( yes| no)*")]
    messages = ["List three fruits with their prices as JSON.", "Answer yes or no, many times."]

    def run(llm: LLM, **sampling: Any) -> list[Any]:
        prompts = [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": m}])} for m in messages]
        params = [SamplingParams(max_tokens=64, structured_outputs=c, **sampling) for c in constraints]
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    plain = run(LLM(show_progress=False), temperature=0)
    speculative = LLM(show_progress=False, **NGRAM)
    assert [o.token_ids for o in run(speculative, temperature=0)] == [o.token_ids for o in plain]
    assert speculative.stats().spec_decode.num_accepted_tokens > 0
    sampled = run(speculative, temperature=1.0, seed=1)[0]
    if sampled.finish_reason == "stop":
        jsonschema.validate(json.loads(sampled.text), FRUITS)
    else:  # cut at max_tokens: still a prefix the grammar allows
        assert sampled.text.startswith('{"items":[')
