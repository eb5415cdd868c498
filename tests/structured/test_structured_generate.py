"""Structured output end to end on the bundled SmolLM2-135M: every output matches its constraint, at temperature 1,
over many schemas and seeds, in mixed batches, across a preemption; unconstrained neighbours are untouched."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from schemas import PERSON, SCHEMAS

from kvserve import LLM, SamplingParams, StructuredOutputsParams
from kvserve.engine.request import RequestStatus

MAX_TOKENS = 128  # every schema here completes in under 40 tokens; "length" would mean the grammar never ended
UNCONSTRAINED = ["The capital of France is", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def chat_prompt(llm: LLM, text: str) -> dict[str, list[int]]:
    return {"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": text}])}


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine.structured.num_active == 0
    assert engine.kv_manager.pool.num_used_blocks == 0


def test_json_schemas_always_validate_at_temperature_1(llm: LLM) -> None:
    # One batch: every schema with its own seed and sampling options, and the person schema three times (n=3, a
    # matcher each). Ten sequences in all, stepped together.
    options: list[dict[str, Any]] = [{}, {"top_k": 20}, {"top_p": 0.9}, {"min_p": 0.05}, {"repetition_penalty": 1.3},
                                     {"presence_penalty": 1.0, "frequency_penalty": 0.5}, {"logprobs": 2},
                                     {"temperature": 1.5}]
    prompts, params = [], []
    for seed, ((name, schema), extra) in enumerate(zip(SCHEMAS.items(), options, strict=True)):
        prompts.append(chat_prompt(llm, f"Reply with JSON for the {name} schema: {json.dumps(schema)}"))
        params.append(SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": MAX_TOKENS, **extra},
                                     structured_outputs=StructuredOutputsParams(json=schema)))
    prompts.append(chat_prompt(llm, "Tell me about a person."))
    params.append(SamplingParams(temperature=1.0, n=3, max_tokens=MAX_TOKENS,
                                 structured_outputs=StructuredOutputsParams(json=PERSON)))
    schemas = [*SCHEMAS.values(), PERSON]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, schema, request_params in zip(outputs, schemas, params, strict=True):
        for completion in output.outputs:
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), schema)
            assert not re.search(r"\s", JSON_STRING.sub("", completion.text)), completion.text  # compact JSON
            if request_params.logprobs is not None:
                assert len(completion.logprobs) == len(completion.token_ids)
    assert len({c.text for c in outputs[-1].outputs}) > 1  # three samples, three matchers, not one shared
    assert_idle(llm)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_regex_choice_and_grammars_match_exactly(llm: LLM, ignore_eos: bool) -> None:
    cases: list[tuple[StructuredOutputsParams, Any]] = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (StructuredOutputsParams(regex=r"(yes|no)\. [A-Z][a-z]{1,8}!"),
         lambda t: re.fullmatch(r"(yes|no)\. [A-Z][a-z]{1,8}!", t)),
        (StructuredOutputsParams(choice=["Paris", "London", "a \"quoted\" \\ one"]),
         lambda t: t in ("Paris", "London", "a \"quoted\" \\ one")),
        (StructuredOutputsParams(grammar='start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/'),
         lambda t: re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", t)),
        (StructuredOutputsParams(grammar='root ::= "ok" | "fail: " [a-z]+ "."'),  # GBNF
         lambda t: re.fullmatch(r"ok|fail: [a-z]+\.", t)),
    ]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=48, ignore_eos=ignore_eos,
                             structured_outputs=constraint) for seed, (constraint, _) in enumerate(cases)]
    outputs = llm.generate([chat_prompt(llm, "What is the answer?")] * len(cases), params, use_tqdm=False)
    for output, (_, matches) in zip(outputs, cases, strict=True):
        completion = output.outputs[0]
        # With ignore_eos the grammar itself ends the request (it consumes the EOS it allowed, or completes).
        assert completion.finish_reason == "stop", completion.text
        assert matches(completion.text), completion.text
    assert_idle(llm)


def test_mixed_batch_leaves_unconstrained_rows_identical(llm: LLM) -> None:
    alone = [o.outputs[0].token_ids for o in llm.generate(UNCONSTRAINED, GREEDY, use_tqdm=False)]
    constrained = [SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_TOKENS,
                                  structured_outputs=StructuredOutputsParams(json=PERSON)),
                   SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                  structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))]
    outputs = llm.generate([chat_prompt(llm, "A person:"), UNCONSTRAINED[0], "Pick one:", UNCONSTRAINED[1]],
                           [constrained[0], GREEDY, constrained[1], GREEDY], use_tqdm=False)
    assert [outputs[1].outputs[0].token_ids, outputs[3].outputs[0].token_ids] == alone
    jsonschema.validate(json.loads(outputs[0].outputs[0].text), PERSON)
    assert outputs[2].outputs[0].text in ("alpha", "beta")


def _run_with_preemption(llm: LLM, prompt: dict[str, list[int]], params: SamplingParams, after_steps: int) -> list[int]:
    """Step the engine by hand and preempt the request (as the scheduler does when blocks run out) midway."""
    engine = llm.engine
    engine.add_request("preempted", prompt, params)
    request = engine.scheduler.requests["preempted"]
    steps = 0
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            final = output
        steps += 1
        if steps == after_steps:
            assert request.status is RequestStatus.RUNNING and request.num_output_tokens > 0
            engine.scheduler.running.remove(request)
            engine.scheduler._preempt(request)
    assert request.num_preemptions == 1
    return final.outputs[0].token_ids


def test_preemption_keeps_the_grammar_state(llm: LLM) -> None:
    prompt = chat_prompt(llm, "Describe a person as JSON.")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS["nested"]))
    expected = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert expected.finish_reason == "stop"
    assert _run_with_preemption(llm, prompt, params, after_steps=4) == expected.token_ids
    jsonschema.validate(json.loads(expected.text), SCHEMAS["nested"])
    assert_idle(llm)


@pytest.mark.parametrize(("constraint", "words"), [
    (StructuredOutputsParams(json={"type": "no-such-type"}), "json"),
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"$ref": "#/missing"}}}), "json"),
    (StructuredOutputsParams(regex="[a-"), "regex"),
    (StructuredOutputsParams(grammar="start: undefined_rule"), "grammar"),
    (StructuredOutputsParams(grammar="this is neither lark nor gbnf ::= ::="), "grammar"),
])
def test_invalid_constraints_are_value_errors_and_queue_nothing(llm: LLM, constraint: StructuredOutputsParams,
                                                                words: str) -> None:
    params = SamplingParams(max_tokens=4, n=2, structured_outputs=constraint)
    with pytest.raises(ValueError, match=f"^structured_outputs {words} ") as error:
        llm.generate(["fine prompt", "another"], [SamplingParams(max_tokens=4), params], use_tqdm=False)
    assert len(str(error.value)) < 700
    assert_idle(llm)
