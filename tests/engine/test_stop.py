"""engine/stop.py: the one stop decision (EOS, stop token ids, stop strings, max_tokens) and its precedence."""

from __future__ import annotations

from typing import Any

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.stop import StopStringMatch, check_stop
from kvserve.sampling_params import SamplingParams

EOS = 2


def request(max_tokens: int = 8, **params: Any) -> Request:
    return Request("r", [5, 6], SamplingParams(max_tokens=max_tokens, **params), max_tokens, frozenset({EOS}))


def generate(req: Request, token_ids: list[int], match: StopStringMatch | None = None) -> list[RequestStatus | None]:
    """Append the tokens one at a time; the decision after each (`match` goes with the last one)."""
    decisions = []
    for index, token_id in enumerate(token_ids):
        req.append_token(token_id)
        decisions.append(check_stop(req, match if index == len(token_ids) - 1 else None))
    return decisions


def test_eos_stops_without_a_reason_unless_ignored():
    req = request()
    assert generate(req, [9, EOS]) == [None, RequestStatus.FINISHED_STOPPED] and req.stop_reason is None
    assert generate(request(ignore_eos=True), [9, EOS]) == [None, None]


def test_eos_and_stop_ids_wait_for_min_tokens():
    assert generate(request(min_tokens=3), [EOS, 7, EOS]) == [None, None, RequestStatus.FINISHED_STOPPED]
    req = request(min_tokens=2, stop_token_ids=[7])
    assert generate(req, [7, 7]) == [None, RequestStatus.FINISHED_STOPPED] and req.stop_reason == 7


def test_length_after_max_tokens():
    req = request(max_tokens=3)
    assert generate(req, [9, 9, 9]) == [None, None, RequestStatus.FINISHED_LENGTH] and req.stop_reason is None


def test_stop_string_names_the_reason_even_on_the_last_allowed_token():
    req = request(max_tokens=2, stop=["ab"])
    assert generate(req, [9, 9], StopStringMatch(3, "ab")) == [None, RequestStatus.FINISHED_STOPPED]
    assert req.stop_reason == "ab"


def test_stop_strings_wait_for_min_tokens(tokenizer: Any) -> None:
    text = "The answer is 42. Goodbye and thanks."
    ids = tokenizer.encode(text)
    # "answer" lies in the first few tokens, before min_tokens is reached, so it does not count.
    params = SamplingParams(stop="answer", min_tokens=len(ids) - 1, max_tokens=None)
    req = Request("r", [1], params, 100)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    matches = []
    for token_id in ids:
        req.append_token(token_id)
        matches.append(detok.append(token_id))
        assert check_stop(req, matches[-1]) is None
    assert any(matches)  # found, but too early to stop
    assert detok.next_delta(is_finished=True) == detok.output_text == text
