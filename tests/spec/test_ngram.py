"""The n-gram proposer against a brute-force oracle, and the adaptive draft length."""

import random

import pytest

from kvserve.spec.ngram import NgramProposer, propose_ngram


def oracle(tokens: list[int], num_drafts: int, min_n: int, max_n: int) -> list[int]:
    """Try every suffix length from the longest down and every earlier start from the latest back."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + num_drafts]
    return []


@pytest.mark.parametrize("seed", range(200))
def test_matches_the_oracle_on_random_repetitive_sequences(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 50])  # small vocabularies repeat a lot, large ones rarely
    tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
    min_n = rng.randrange(1, 4)
    max_n = rng.randrange(min_n, 7)
    num_drafts = rng.randrange(1, 6)
    assert propose_ngram(tokens, num_drafts, min_n, max_n) == oracle(tokens, num_drafts, min_n, max_n)


def test_the_longest_match_wins_then_the_latest():
    # "2 3" occurs twice before the end; "1 2 3" only once (followed by 4).
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3]
    assert propose_ngram(tokens, 2, 1, 3) == [4, 9]
    assert propose_ngram(tokens, 2, 1, 2) == [5, 1]  # only 2-grams: the latest "2 3" is followed by 5
    assert propose_ngram(tokens, 2, 4, 5) == []  # no 4-gram repeats


def test_drafts_stop_at_the_end_of_the_sequence_and_short_inputs_propose_nothing():
    assert propose_ngram([7, 7, 7], 5, 1, 3) == [7]
    assert propose_ngram([7], 5, 1, 3) == []
    assert propose_ngram([1, 2], 5, 1, 3) == []
    assert NgramProposer(3, 1, 2).propose([1, 2, 3, 4, 1, 2], 8) == [3, 4, 1]  # capped at max_drafts

