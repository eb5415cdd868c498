"""Which packed rows score prompt tokens, and the scoring of a slice of rows against a log_softmax."""

from __future__ import annotations

import pytest
import torch

from kvserve.runner.input_batch import CachedRequestState, StepBatch
from kvserve.runner.prompt_logprobs import compute_prompt_logprobs, prompt_logprob_spans
from kvserve.sampling_params import SamplingParams


def state(req_id: str, prompt: list[int], outputs: list[int] = (), prompt_logprobs: int | None = 1,
          num_computed: int = 0) -> CachedRequestState:
    return CachedRequestState(req_id, prompt, list(outputs), [*prompt, *outputs],
                              SamplingParams(prompt_logprobs=prompt_logprobs), frozenset(), [], num_computed)


def batch_of(*entries: tuple[CachedRequestState, int]) -> StepBatch:
    """(state, num new tokens) in batch order, each starting at its num_computed_tokens."""
    batch = StepBatch([], [], [], [], [], [])
    for request, count in entries:
        start = request.num_computed_tokens
        batch.requests.append(request)
        batch.num_computed_tokens.append(start)
        batch.num_new_tokens.append(count)
        batch.block_tables.append([])
        batch.token_ids.extend(request.all_token_ids[start:start + count])
    return batch


def test_spans_cover_prompt_rows_but_not_the_sampling_row() -> None:
    decode = state("decode", [1, 2, 3], outputs=[4], num_computed=3)  # has outputs: scored before
    plain = state("plain", [5, 6, 7, 8], prompt_logprobs=None)
    first_chunk = state("first", [10, 11, 12, 13, 14, 15])
    last_chunk = state("last", [20, 21, 22, 23, 24], num_computed=3)
    spans = prompt_logprob_spans(batch_of((decode, 1), (plain, 4), (first_chunk, 3), (last_chunk, 2)))
    # Packed rows: decode 0, plain 1-4, first 5-7, last 8-9 (row 9 is the last prompt token: it samples).
    assert [(s.req_id, s.first_index, s.first_row, s.num_rows, s.targets) for s in spans] == [
        ("first", 1, 5, 3, [11, 12, 13]),
        ("last", 4, 8, 1, [24]),
    ]


def test_scored_rows_equal_log_softmax_and_slices_join_up(monkeypatch) -> None:
    monkeypatch.setattr("kvserve.runner.prompt_logprobs._ROWS_PER_SLICE", 2)  # 5 rows: slices of 2, 2, 1
    vocab = 11
    weight = torch.randn(vocab, 4, generator=torch.Generator().manual_seed(0))

    class Head(torch.nn.Module):
        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden @ weight.T

    request = state("r", [3, 1, 4, 1, 5, 9], prompt_logprobs=2)
    hidden = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    [(req_id, (first_index, entries))] = compute_prompt_logprobs(Head(), hidden, batch_of((request, 6))).items()
    assert req_id == "r" and first_index == 1 and len(entries) == 5
    reference = torch.log_softmax(hidden @ weight.T, dim=-1)
    for row, (target, entry) in enumerate(zip([1, 4, 1, 5, 9], entries, strict=True)):
        top = reference[row].topk(2)
        expected = {int(i): v for i, v in zip(top.indices, top.values.tolist(), strict=True)}
        expected[target] = reference[row, target].item()
        assert entry.keys() == expected.keys()
        assert list(entry.values()) == pytest.approx([expected[k] for k in entry], abs=1e-6)
