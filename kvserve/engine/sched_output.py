"""The scheduler→runner contract: plain data that could be pickled to another process (no live Request, no torch).

Each step the scheduler sends a `SchedulerOutput`; the runner keeps its own copy of every request it holds
(runner/input_batch.py) and the output only carries what the runner cannot know:
- `NewRequestData` once, when a request is first scheduled or rescheduled after a preemption (the runner
  dropped it then): its tokens so far, sampling params and whole block table.
- `CachedRequestData` on every later step: a diff. A decode's diff is the token sampled last step and, every
  `block_size` tokens, one new block id.
The runner answers with a `ModelRunnerOutput`: the tokens it sampled per request (several when draft tokens
are accepted), and the scheduler credits only the accepted ones.

Sinks + sliding window: the KV manager replaces evicted block-table entries with EVICTED, but a diff only
appends block ids. The runner applies the same pure-Python rule to its copy (kv/sinks_window.py), driven by
`num_computed_tokens`, so both tables agree without evictions crossing the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np


@dataclass
class NewRequestData:
    """A request the runner does not hold: everything it needs, sent once per (re)scheduling."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before a preemption: recomputed with the prompt
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]  # model-wide, for min_tokens
    block_ids: list[int]  # the whole block table (EVICTED where a window took blocks back)
    num_computed_tokens: int  # tokens already in the KV cache (a prefix-cache hit)


@dataclass
class CachedRequestData:
    """What changed since the runner last saw a request it holds."""

    req_id: str
    new_token_ids: list[int]  # tokens appended since then (the token sampled last step)
    new_block_ids: list[int]  # blocks appended to its table
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step's work: the only thing that crosses from scheduler to runner."""

    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # New tokens each request computes this step, in scheduling order (running requests first).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Draft tokens each speculating request verifies this step, after its last known token (spec/).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Whether the runner should propose drafts for the next step: false while more requests run than
    # speculative_disable_by_batch_size (the next step would not verify them).
    propose_drafts: bool = True
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # since the last step
    # Structured output (kvserve/structured): the grammar-constrained requests that sample this step, and their
    # allowed tokens, row i for structured_output_req_ids[i]: [rows, ceil(vocab / 32)] int32, bit j of word w set
    # when token 32 * w + j is allowed. None (and no list) when no scheduled request is constrained.
    structured_output_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: np.ndarray | None = None

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to compute."""
        return not self.num_scheduled_tokens


@dataclass
class ModelRunnerOutput:
    """What the runner hands back: the sampled tokens of every scheduled request, in batch order."""

    req_ids: list[str]
    # One list per request: empty for a prompt chunk, one token for a decode, several when drafts are accepted.
    sampled_token_ids: list[list[int]]
    # Per request, one {token id: logprob} per sampled token; None when the request asked for none.
    logprobs: list[list[dict[int, float]] | None]
    # Requests with prompt_logprobs whose prompt rows ran this step: {req id: (index in the prompt of the first
    # token scored, one {token id: logprob} per scored prompt token)}.
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)
    # Speculative decoding: draft tokens proposed for each request's next step (from its tokens with these sampled).
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)


def num_rejected_drafts(num_drafts: int, num_sampled: int) -> int:
    """Draft tokens the runner did not accept: a verified step samples each accepted draft plus one token."""
    return num_drafts + 1 - num_sampled if num_drafts else 0
