"""A request's state as the scheduler tracks it (pure Python)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        """True for every finished state."""
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    """One sequence being generated: its tokens, how many of them are in the KV cache, and its timings."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # sampling_params.max_tokens, or the room its context leaves when that is None
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on admission
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # proposed by the runner, verified next step
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens so far."""
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """Whether the request has reached any finished state."""
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style finish reason: 'stop', 'length', 'abort', 'error', or None while running."""
        return self.status.value if self.status.is_finished else None

    def append_token(self, token_id: int) -> None:
        """Record one generated token."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
