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
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 2], got 0.0"),
        ({"repetition_penalty": 2.5}, "repetition_penalty must be in (0, 2], got 2.5"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be in (0, 2], got inf"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be in (0, 2], got nan"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be in [0, 20], got -1"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20], got 21"),
        ({"logit_bias": {5: 101}}, "logit_bias values must be in [-100, 100], got 101 for token 5"),
        ({"logit_bias": {5: -100.5}}, "logit_bias values must be in [-100, 100], got -100.5 for token 5"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias values must be in [-100, 100], got nan for token 5"),
        ({"logit_bias": {5: "1"}}, "logit_bias values must be numbers, got '1' for token 5"),
        ({"logit_bias": {"5": 1}}, "logit_bias keys must be token ids (int), got '5'"),
        ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias must have at most 300 entries, got 301"),
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
        {"repetition_penalty": 2.0},
        {"repetition_penalty": 1e-300},  # accepted like vLLM; the sampler's guard keeps it sane
        {"prompt_logprobs": 0},
        {"prompt_logprobs": 20},
        {"logit_bias": {0: -100, 7: 100.0, 8: 0.5}},
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


def test_verify_logit_bias_token_ids_against_vocab() -> None:
    SamplingParams(logit_bias={0: 1, 99: -1}).verify(vocab_size=100)
    for bad in (100, -1):
        with pytest.raises(ValueError, match=rf"logit_bias token ids must be in \[0, 100\), got {bad}"):
            SamplingParams(logit_bias={5: 1, bad: 1}).verify(vocab_size=100)


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
