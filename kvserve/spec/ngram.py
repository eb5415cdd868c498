"""The n-gram proposer (prompt lookup): draft the tokens that followed an earlier occurrence of the sequence's end.

Copy-heavy outputs (rewriting a file, quoting a passage, filling a template) repeat runs of the prompt and of
themselves; when the last n tokens occurred before, the tokens after that occurrence are a cheap guess at what
comes next. The longest match in [min_n, max_n] wins, then the latest. No model runs: numpy over the token ids,
a few vectorized compares per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvserve.runner.input_batch import StepBatch


def propose_ngram(token_ids: Sequence[int] | np.ndarray, num_drafts: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_drafts` tokens that followed the latest earlier occurrence of the longest suffix of
    `token_ids` of at least `min_n` and at most `max_n` tokens; [] when no such suffix occurred before."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    last = len(tokens) - 1
    if last < min_n or num_drafts <= 0:
        return []
    # Candidate occurrences, named by where they end: earlier positions holding the last token.
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # [candidates]
    if len(ends) == 0:
        return []
    # Extend every candidate backwards at once: length[c] = how many trailing tokens it matches (<= max_n).
    length = np.ones(len(ends), dtype=np.int64)
    matching = np.ones(len(ends), dtype=bool)
    for back in range(1, min(max_n, last + 1)):
        inside = ends >= back  # the occurrence has a token `back` before its end
        matching &= inside
        matching[inside] &= tokens[ends[inside] - back] == tokens[last - back]
        length += matching
    best = length.max()
    if best < min_n:
        return []
    end = ends[np.flatnonzero(length == best)[-1]]  # the latest of the longest
    return tokens[end + 1:end + 1 + num_drafts].tolist()


class NgramProposer:
    """Prompt lookup for every request: up to `max_drafts` tokens where a suffix of min_n..max_n tokens matches."""

    def __init__(self, max_drafts: int, min_n: int, max_n: int) -> None:
        self.max_drafts = max_drafts
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: Sequence[int], num_drafts: int) -> list[int]:
        """Up to `num_drafts` drafts to follow `token_ids` (a request's prompt and output so far); [] when nothing
        matches."""
        return propose_ngram(token_ids, min(num_drafts, self.max_drafts), self.min_n, self.max_n)

    def propose_step(self, batch: StepBatch, sampled: list[list[int]], wanted: dict[int, int]
                     ) -> dict[str, list[int]]:
        """Drafts for request i of the step (`wanted[i]` at most), from its tokens and the ones it just sampled."""
        return {batch.requests[i].req_id: self.propose([*batch.requests[i].all_token_ids, *sampled[i]], num_drafts)
                for i, num_drafts in wanted.items()}

