"""Prompt logprobs: the logprob of every prompt token given the ones before it, plus the top alternatives.

Only the last row of a prompt chunk is normally projected to logits. A request with `prompt_logprobs` also has
every other row of its prompt chunks projected: row p predicts prompt token p + 1. The last prompt row predicts
the first generated token, so it belongs to sampling. Rows are projected in slices, so that a long chunk never
holds a [chunk, vocab] logits tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvserve.runner.input_batch import StepBatch

# Rows projected to logits at once: a slice holds [rows, vocab] float32 (256 x 49152 x 4 bytes = 48 MiB).
_ROWS_PER_SLICE = 256

# Per request: (index in the prompt of the first token scored, one {token id: logprob} per scored token).
PromptLogprobsChunk = tuple[int, list[dict[int, float]]]


@dataclass(frozen=True)
class _Span:
    """Rows of one request's prompt chunk that score prompt tokens."""

    req_id: str
    first_index: int  # in the prompt, of the first token scored: row p scores prompt token p + 1
    first_row: int  # in the packed step
    num_rows: int
    targets: list[int]  # the prompt tokens the rows predict, [num_rows]
    num_top: int


def prompt_logprob_spans(batch: StepBatch) -> list[_Span]:
    """The spans of this step's requests that asked for prompt logprobs and compute prompt tokens now.

    A request that already has output tokens (recomputed after a preemption) reported its prompt logprobs
    before and is skipped.
    """
    spans = []
    row = 0
    for state, start, count in zip(batch.requests, batch.num_computed_tokens, batch.num_new_tokens, strict=True):
        num_top = state.sampling_params.prompt_logprobs
        if num_top is not None and not state.output_token_ids:
            end = min(start + count, len(state.prompt_token_ids) - 1)  # the last prompt row samples instead
            if end > start:
                targets = state.prompt_token_ids[start + 1:end + 1]
                spans.append(_Span(state.req_id, start + 1, row, end - start, targets, num_top))
        row += count
    return spans


def compute_prompt_logprobs(model: nn.Module, hidden: torch.Tensor, batch: StepBatch
                            ) -> dict[str, PromptLogprobsChunk]:
    """{req id: (first prompt index scored, entries)} for this step's prompt rows, from `hidden` [T, hidden]."""
    result: dict[str, PromptLogprobsChunk] = {}
    for span in prompt_logprob_spans(batch):
        entries: list[dict[int, float]] = []
        for offset in range(0, span.num_rows, _ROWS_PER_SLICE):
            num = min(_ROWS_PER_SLICE, span.num_rows - offset)
            rows = hidden[span.first_row + offset:span.first_row + offset + num]  # [num, hidden]
            targets = span.targets[offset:offset + num]
            entries.extend(_score_rows(model.compute_logits(rows), targets, span.num_top))
        result[span.req_id] = (span.first_index, entries)
    return result


def _score_rows(logits: torch.Tensor, targets: list[int], num_top: int) -> list[dict[int, float]]:
    """Per row of `logits` [rows, vocab]: {target: logprob} plus the `num_top` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows, vocab]
    target_ids = torch.tensor(targets, device=logits.device).unsqueeze(1)  # [rows, 1]
    target_values = logprobs.gather(1, target_ids)  # [rows, 1]
    top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [rows, num_top]
    # float64 holds every token id and float32 logprob exactly: one copy to the host.
    parts = (target_ids, top_ids, target_values, top_values)
    packed = torch.cat([part.to(torch.float64) for part in parts], dim=1).tolist()  # [rows, 2 + 2 * num_top]
    entries = []
    for row in packed:
        entry = {int(i): v for i, v in zip(row[1:1 + num_top], row[2 + num_top:], strict=True)}
        entry[int(row[0])] = row[1 + num_top]
        entries.append(entry)
    return entries
