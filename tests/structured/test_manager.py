"""StructuredOutputManager on the bundled tokenizer: the step's bitmask rows, the grammar cache, the whitespace
mode, and each sequence's own matcher."""

from __future__ import annotations

import numpy as np
import pytest

from kvserve import LLM, StructuredOutputsParams
from kvserve.engine.request import Request
from kvserve.engine.sched_output import SchedulerOutput
from kvserve.sampling_params import SamplingParams
from kvserve.structured.manager import StructuredOutputManager

OBJECT = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})


@pytest.fixture
def manager(llm: LLM) -> StructuredOutputManager:
    engine = llm.engine
    return StructuredOutputManager(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids,
                                   cache_size=2)


def allowed_tokens(bitmask_row: np.ndarray) -> set[int]:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def request(request_id: str, num_prompt: int, num_computed: int) -> Request:
    req = Request(request_id, list(range(100, 100 + num_prompt)), SamplingParams(), max_tokens=8)
    req.num_computed_tokens = num_computed
    return req


def test_bitmask_rows_are_the_constrained_requests_that_sample(manager: StructuredOutputManager, llm: LLM) -> None:
    manager.add_requests(OBJECT, ["decode", "chunk"])
    manager.add_requests(StructuredOutputsParams(choice=["yes"]), ["last-chunk"])
    requests = {"decode": request("decode", 5, 4), "chunk": request("chunk", 40, 0),
                "last-chunk": request("last-chunk", 40, 32), "free": request("free", 5, 4)}
    # "chunk" computes 16 of its 40 prompt tokens (no sample); "last-chunk" reaches its last token (samples).
    output = SchedulerOutput(num_scheduled_tokens={"decode": 1, "free": 1, "chunk": 16, "last-chunk": 8})
    manager.fill_bitmask(output, requests)
    assert output.structured_output_req_ids == ["decode", "last-chunk"]
    assert output.grammar_bitmask.dtype == np.int32 and output.grammar_bitmask.shape == (2, manager.num_words)
    tokenizer = llm.get_tokenizer()
    assert {tokenizer.decode([t]) for t in allowed_tokens(output.grammar_bitmask[0])} == {"{", "{}", '{"'}
    choice = {tokenizer.decode([t]) for t in allowed_tokens(output.grammar_bitmask[1])}
    assert tokenizer.decode(tokenizer.encode("yes", add_special_tokens=False)[:1]) in choice
    assert all("yes".startswith(text) for text in choice)
    # A step without a constrained sampler carries nothing.
    quiet = SchedulerOutput(num_scheduled_tokens={"free": 1, "chunk": 16})
    manager.fill_bitmask(quiet, requests)
    assert quiet.structured_output_req_ids == [] and quiet.grammar_bitmask is None


def test_a_request_verifying_drafts_gets_a_row_per_draft(manager: StructuredOutputManager, llm: LLM) -> None:
    """Row j is the grammar after the first j drafts; from a draft the grammar rejects (or an EOS) on, rows repeat
    the last one; the matcher is where it was afterwards."""
    tokenizer = llm.get_tokenizer()
    yes, space_no = (tokenizer.encode(text, add_special_tokens=False) for text in ("yes", " no"))
    assert len(yes) == len(space_no) == 1
    manager.add_requests(StructuredOutputsParams(regex="(yes|no)( yes| no)*"), ["a", "b"])
    requests = {"a": request("a", 5, 4), "b": request("b", 5, 4)}
    eos = min(llm.engine.eos_token_ids)
    drafts = {"a": [yes[0], space_no[0], yes[0], eos], "b": [space_no[0], yes[0]]}  # "yes no", then invalid ones
    output = SchedulerOutput(num_scheduled_tokens={"a": 5, "b": 3}, scheduled_spec_decode_tokens=drafts)
    manager.fill_bitmask(output, requests)
    assert output.structured_output_req_ids == ["a", "b"] and output.grammar_bitmask.shape[0] == 5 + 3
    rows = [allowed_tokens(row) for row in output.grammar_bitmask]
    assert yes[0] in rows[0] and space_no[0] not in rows[0]  # a first word
    assert space_no[0] in rows[1] and eos in rows[1] and yes[0] not in rows[1]  # after "yes": " no", " yes" or end
    assert rows[2] == rows[1]  # after "yes no": the same choices
    assert rows[3] == rows[4] == rows[2]  # "yes" after "no" is rejected: the rows repeat
    assert rows[5] == rows[6] == rows[7] == rows[0]  # b's first draft is rejected at once
    again = SchedulerOutput(num_scheduled_tokens={"a": 1})
    manager.fill_bitmask(again, requests)
    assert allowed_tokens(again.grammar_bitmask[0]) == rows[0]  # every draft rolled back


def test_each_sequence_has_its_own_matcher_and_free_forgets_it(manager: StructuredOutputManager, llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    manager.add_requests(StructuredOutputsParams(choice=["ab", "cd"]), ["s#0", "s#1"])
    assert manager.num_active == 2
    for token in tokenizer.encode("ab", add_special_tokens=False):
        assert manager.accept_token("s#0", token)
    assert manager.is_terminated("s#0") and not manager.is_terminated("s#1")
    assert not manager.accept_token("s#1", tokenizer.encode("zz", add_special_tokens=False)[0])  # rejected
    manager.free("s#0")
    manager.free("s#1")
    manager.free("unknown")
    assert manager.num_active == 0 and "s#0" not in manager


def test_grammar_cache_is_a_bounded_lru(manager: StructuredOutputManager) -> None:
    params = [StructuredOutputsParams(regex=f"[a-z]{{{i}}}") for i in (1, 2, 3)]
    first = manager._compile(params[0])
    assert manager._compile(StructuredOutputsParams(regex="[a-z]{1}")) is first  # same key: compiled once
    manager._compile(params[1])
    manager._compile(params[0])  # touch: now the most recent
    manager._compile(params[2])
    assert list(manager._compiled) == [params[0].cache_key, params[2].cache_key]


def test_invalid_grammar_registers_nothing(manager: StructuredOutputManager) -> None:
    with pytest.raises(ValueError, match="^structured_outputs regex "):
        manager.add_requests(StructuredOutputsParams(regex="(unclosed"), ["bad"])
    assert manager.num_active == 0 and not manager._compiled


@pytest.mark.parametrize("disable_any_whitespace", [True, False])
def test_whitespace_mode(manager: StructuredOutputManager, llm: LLM, disable_any_whitespace: bool) -> None:
    tokenizer = llm.get_tokenizer()
    params = StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=disable_any_whitespace)
    manager.add_requests(params, ["r"])
    for token in tokenizer.encode("{", add_special_tokens=False):
        manager.accept_token("r", token)
    output = SchedulerOutput(num_scheduled_tokens={"r": 1})
    manager.fill_bitmask(output, {"r": request("r", 3, 2)})
    texts = {tokenizer.decode([t]) for t in allowed_tokens(output.grammar_bitmask[0])}
    has_whitespace = any(text.isspace() for text in texts)
    assert has_whitespace is not disable_any_whitespace  # compact by default; vLLM's flexible whitespace on request


def test_one_of_compiles_as_any_of(manager: StructuredOutputManager) -> None:
    # pydantic writes unions as oneOf; llguidance alone refuses it.
    schema = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"type": "object", "properties": {"b": {"type": "string"}}}]}  # branches that overlap
    manager.add_requests(StructuredOutputsParams(json=schema), ["union"])
    assert "union" in manager
