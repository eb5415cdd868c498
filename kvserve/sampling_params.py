"""Per-request sampling parameters, with vLLM-compatible field names."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvserve.structured.params import StructuredOutputsParams

# Below this temperature a request is treated as greedy: dividing logits by such a small
# number only overflows and the argmax is what the user meant anyway.
_GREEDY_TEMPERATURE = 1e-5
_MAX_LOGPROBS = 20
# OpenAI's range for a logit bias, and a cap on entries: each is one (row, column) write per step.
_MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300
# SGLang's upper bound (vLLM only asks for a finite, positive value); a penalty so small that float32
# rounds it to 0 still passes, and the sampler's non-finite guard keeps such rows sane.
_MAX_REPETITION_PENALTY = 2.0


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request (names follow vLLM)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    # Top alternatives per prompt token (0: only the prompt token's own logprob); None: no prompt logprobs.
    prompt_logprobs: int | None = None
    # {token id: bias in [-100, 100]} added to the logits before sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrain the output to a JSON schema, regex, choice or grammar (kvserve/structured).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Normalize so that consumers never branch on None / str.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self._validate()

    def _validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0 < self.repetition_penalty <= _MAX_REPETITION_PENALTY:  # NaN fails this too
            raise ValueError(f"repetition_penalty must be in (0, {_MAX_REPETITION_PENALTY:g}], "
                             f"got {self.repetition_penalty}")
        # bool is an int subclass, but seed=True is surely a mistake.
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= _MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {_MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= _MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {_MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop must not contain empty strings")
        if self.logit_bias is not None:
            _check_logit_bias(self.logit_bias)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(self.structured_outputs).__name__}")

    def verify(self, vocab_size: int) -> None:
        """Check the fields that depend on the model's vocabulary."""
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"stop_token_ids must be in [0, {vocab_size}), got {token_id}")
        for token_id in self.logit_bias or ():
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"logit_bias token ids must be in [0, {vocab_size}), got {token_id}")

    @property
    def is_greedy(self) -> bool:
        """Whether this request takes the argmax instead of sampling."""
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def has_logit_bias(self) -> bool:
        """Whether a logit bias is set (an empty map is none)."""
        return bool(self.logit_bias)

    @property
    def has_penalties(self) -> bool:
        """Whether any repetition / presence / frequency penalty is active."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check_logit_bias(logit_bias: dict[int, float]) -> None:
    """Integer token ids (the vocabulary is checked in `verify`) to finite biases in [-100, 100]."""
    if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(logit_bias)}")
    for token_id, bias in logit_bias.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ValueError(f"logit_bias keys must be token ids (int), got {token_id!r}")
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise ValueError(f"logit_bias values must be numbers, got {bias!r} for token {token_id}")
        if not (math.isfinite(bias) and -_MAX_LOGIT_BIAS <= bias <= _MAX_LOGIT_BIAS):
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}")
