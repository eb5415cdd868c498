"""StructuredOutputsParams: exactly one constraint, each of the right shape, errors naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from kvserve import SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("kwargs", [
    {"json": SCHEMA}, {"json": '{"type": "string"}'}, {"regex": "[0-9]+"}, {"choice": ["yes", "no"]},
    {"grammar": 'start: "a" | "b"'}, {"json_object": True}, {"json": SCHEMA, "json_object": False},
])
def test_one_constraint_is_accepted(kwargs: dict) -> None:
    params = StructuredOutputsParams(**kwargs)
    assert params.kind == next(k for k, v in kwargs.items() if v is not False)
    assert SamplingParams(structured_outputs=params).structured_outputs is params


@pytest.mark.parametrize(("kwargs", "words"), [
    ({}, "exactly one"),
    ({"json": SCHEMA, "regex": "a"}, "exactly one"),
    ({"choice": ["a"], "grammar": "start: a"}, "exactly one"),
    ({"json_object": False}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be a JSON schema"),
    ({"choice": []}, "non-empty strings"),
    ({"choice": ["a", ""]}, "non-empty strings"),
    ({"choice": ["x"] * 1025}, "at most 1024"),
    ({"regex": ""}, "non-empty string"),
    ({"grammar": 7}, "non-empty string"),
    ({"json": "true"}, "JSON schema object"),  # llguidance compiles objects only; {} is "any value"
    ({"regex": "a\ud800"}, "lone surrogate"),
    ({"choice": ["ok", "\udfff"]}, "lone surrogate"),
    ({"json": '{"pattern": "\ud800"}'}, "lone surrogate"),
])
def test_bad_constraints_name_the_field(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words) as error:
        StructuredOutputsParams(**kwargs)
    assert str(error.value).startswith("structured_outputs ")


def test_sampling_params_wants_the_dataclass() -> None:
    with pytest.raises(ValueError, match="^structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": SCHEMA})


def test_cache_key_ignores_spelling_but_not_whitespace_mode() -> None:
    as_dict = StructuredOutputsParams(json={"b": 1, "a": [1, 2]})
    as_text = StructuredOutputsParams(json='{"a": [1, 2], "b": 1}')
    assert as_dict.cache_key == as_text.cache_key
    assert as_dict.cache_key != StructuredOutputsParams(json={"b": 1, "a": [1, 2]},
                                                        disable_any_whitespace=False).cache_key
    assert as_dict.cache_key != StructuredOutputsParams(regex='{"a": [1, 2], "b": 1}').cache_key


def test_choice_is_copied_and_params_survive_replace() -> None:
    choices = ["a", "b"]
    params = StructuredOutputsParams(choice=choices)
    choices.append("c")
    assert params.choice == ["a", "b"]
    sampling = SamplingParams(seed=1, structured_outputs=params)
    assert dataclasses.replace(sampling, seed=2).structured_outputs is params  # each of `n` samples keeps it
