"""IncrementalDetokenizer against the bundled SmolLM2 tokenizer: UTF-8, specials, stop-string matches and the
text after a stop."""

from __future__ import annotations

from typing import Any

import pytest

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.sampling_params import SamplingParams

PROMPT = "User: say something\nAssistant:"
TEXTS = [
    "你好，世界！今天天气很好。",
    "🎉😀 party time 👨‍👩‍👧‍👦 family 🇫🇷",
    "Mixed: café naïve 日本語 Ελληνικά русский 한국어 ✓ — done.",
    "emoji at the end 🤖",
]


def append(detok: IncrementalDetokenizer, token_id: int) -> str | None:
    """Add a token and, as the engine does when a match stops the request, end the text at the stop string."""
    match = detok.append(token_id)
    if match is None:
        return None
    detok.stop_at(match)
    return match.stop


def stream(
    tokenizer: Any, ids: list[int], params: SamplingParams, prompt: str = PROMPT
) -> tuple[IncrementalDetokenizer, list[str], list[str | None]]:
    """Feed ids one at a time; return the detokenizer, every delta and each stop string matched."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), params)
    deltas: list[str] = []
    stops: list[str | None] = []
    for token_id in ids:
        stops.append(append(detok, token_id))
        deltas.append(detok.next_delta(is_finished=False))
    deltas.append(detok.next_delta(is_finished=True))
    return detok, deltas, stops


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    detok, deltas, stops = stream(tokenizer, ids, SamplingParams())
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == text
    assert "".join(deltas) == expected
    assert detok.output_text == expected
    assert all("\ufffd" not in delta for delta in deltas)
    assert stops == [None] * len(ids)


def test_text_starts_mid_word_after_prompt(tokenizer: Any) -> None:
    ids = tokenizer.encode(" the capital of France is Paris.")
    _, deltas, _ = stream(tokenizer, ids, SamplingParams(), prompt="Q: what is")
    assert "".join(deltas) == " the capital of France is Paris."


def test_special_tokens_skipped_or_kept(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hi there<|im_end|>\n<|im_start|>assistant 你好")
    assert tokenizer.eos_token_id in ids
    _, skipped, _ = stream(tokenizer, ids, SamplingParams())
    assert "".join(skipped) == tokenizer.decode(ids, skip_special_tokens=True)
    _, kept, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(kept) == tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" in "".join(kept)


def test_partial_character_is_held_until_finished(tokenizer: Any) -> None:
    ids = tokenizer.encode("你")
    assert len(ids) > 1  # one character, several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.append(ids[0])
    assert detok.next_delta(is_finished=False) == ""
    # A request that ends mid-character still reports its bytes, as decode() would.
    assert detok.next_delta(is_finished=True) == tokenizer.decode(ids[:1])


def test_decode_window_stays_small(tokenizer: Any) -> None:
    class CountingTokenizer:
        """Records the length of every id list passed to decode."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.all_special_ids = inner.all_special_ids
            self.added_tokens_decoder = inner.added_tokens_decoder
            self.lengths: list[int] = []

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            self.lengths.append(len(ids))
            return self.inner.decode(ids, **kwargs)

    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS) * 10)
    detok = IncrementalDetokenizer(counting, tokenizer.encode(PROMPT), SamplingParams())
    for token_id in ids:
        detok.append(token_id)
    assert detok.output_text == tokenizer.decode(ids)
    assert max(counting.lengths) <= 8  # O(1) per token, not O(length)


STOP_TEXT = "The answer is 42. 你好世界! Goodbye and thanks."


def spans_tokens(tokenizer: Any, ids: list[int], stop: str) -> bool:
    """Whether no single token's text contains `stop`, so it must span a boundary."""
    return all(stop not in tokenizer.decode([token_id]) for token_id in ids)


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        ("is 42", False, "The answer "),
        ("is 42", True, "The answer is 42"),
        ("世界", False, "The answer is 42. 你好"),
        ("世界", True, "The answer is 42. 你好世界"),
        ("42. 你", False, "The answer is "),
    ],
)
def test_stop_string_truncates(tokenizer: Any, stop: str, include: bool, expected: str) -> None:
    ids = tokenizer.encode(STOP_TEXT)
    assert spans_tokens(tokenizer, ids, stop)
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    detok, deltas, stops = stream(tokenizer, ids, params)
    assert detok.output_text == expected
    assert "".join(deltas) == expected
    assert [s for s in stops if s is not None] == [stop]
    assert detok.is_stopped
    if not include:
        # The hold-back must not let any piece of the stop string out before it completed.
        streamed = ""
        for delta in deltas:
            streamed += delta
            assert stop not in streamed


def test_hold_back_never_leaks_stop_prefix(tokenizer: Any) -> None:
    stop = "Goodbye and thanks"
    ids = tokenizer.encode(STOP_TEXT)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stop))
    streamed = ""
    for token_id in ids:
        if append(detok, token_id) is not None:
            break
        streamed += detok.next_delta(is_finished=False)
        # Whatever is out may not end in a started stop string: it could not be taken back.
        assert not any(streamed.endswith(stop[:n]) for n in range(1, len(stop)))
    streamed += detok.next_delta(is_finished=True)
    assert streamed == detok.output_text == "The answer is 42. 你好世界! "


def test_held_text_is_released_when_stop_does_not_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode(STOP_TEXT)
    # "The answer is" is a prefix of the stop but the text goes on differently.
    _, deltas, stops = stream(tokenizer, ids, SamplingParams(stop="The answer is 43"))
    assert stops == [None] * len(ids)
    assert "".join(deltas) == STOP_TEXT
    streamed = ["".join(deltas[: i + 1]) for i in range(len(deltas))]
    # Held while it could still become the stop, released as soon as "2" rules that out.
    first_out = next(text for text in streamed if text)
    assert first_out.startswith("The answer is 42")
    assert streamed[-2] == STOP_TEXT  # nothing was held back at the end


def test_earliest_of_several_stops_wins(tokenizer: Any) -> None:
    ids = tokenizer.encode(STOP_TEXT)
    params = SamplingParams(stop=["thanks", "42", "Goodbye"])
    detok, _, stops = stream(tokenizer, ids, params)
    assert detok.output_text == "The answer is "
    assert [s for s in stops if s is not None] == ["42"]


def test_tokens_after_stop_are_ignored(tokenizer: Any) -> None:
    ids = tokenizer.encode(STOP_TEXT)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="42"))
    results = [append(detok, token_id) for token_id in ids]
    assert results.count("42") == 1
    assert detok.output_text == "The answer is "


def test_a_match_that_does_not_stop_leaves_the_text_whole(tokenizer: Any) -> None:
    # The detokenizer reports the match; without stop_at (engine/stop.py said go on) the text carries on.
    ids = tokenizer.encode(STOP_TEXT)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="answer"))
    matches = [detok.append(token_id) for token_id in ids]
    [match] = [m for m in matches if m is not None]
    assert (match.index, match.stop) == (4, "answer")
    assert detok.next_delta(is_finished=True) == detok.output_text == STOP_TEXT
