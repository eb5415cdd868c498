"""SamplingParams: defaults, normalization and one test per validation error."""

from __future__ import annotations

import pytest

from kvserve.sampling_params import SamplingParams


def test_defaults_and_normalization() -> None:
    params = SamplingParams()
    assert params.stop == [] and params.stop_token_ids == []
    assert params.max_tokens == 16 and params.top_k == -1 and not params.is_greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"temperature": -1}, "temperature must be >= 0, got -1"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -2}, "top_k must be -1 (disable), 0 (disable) or >= 1, got -2"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"presence_penalty": -3}, "presence_penalty must be in [-2, 2], got -3"),
        ({"frequency_penalty": -2.1}, "frequency_penalty must be in [-2, 2], got -2.1"),
        ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2], got 3"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
        ({"seed": 1.5}, "seed must be an int or None, got 1.5"),
        ({"seed": "7"}, "seed must be an int or None, got '7'"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens (4), got 5"),
        ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
        ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ({"stop": ["ok", ""]}, "stop must not contain empty strings"),
    ],
)
def test_invalid_values_name_field_and_limit(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"top_k": -1},
        {"top_k": 1},
        {"top_p": 1.0},
        {"min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"max_tokens": None, "min_tokens": 100},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": 0},
        {"temperature": 0},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    params = SamplingParams(**kwargs)
    assert {name: getattr(params, name) for name in kwargs} == kwargs


def test_verify_stop_token_ids_against_vocab() -> None:
    SamplingParams(stop_token_ids=[0, 99]).verify(vocab_size=100)
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 100\), got 100"):
        SamplingParams(stop_token_ids=[5, 100]).verify(vocab_size=100)
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 100\), got -1"):
        SamplingParams(stop_token_ids=[-1]).verify(vocab_size=100)


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
