"""Batched token sampling for a mixed batch: each row follows its own SamplingParams."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import chain

import torch

from kvserve.sample.bitmask import apply_token_bitmask
from kvserve.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """Everything the sampler needs for one step, one entry per row of logits.

    `eos_token_ids` is model-wide (a model may have several, e.g. <|eot_id|> and
    <|end_of_text|>); per-request stop ids come from `params[i].stop_token_ids`.
    The summary flags are computed once here, when the runner builds the metadata, so that
    the all-greedy decode step in `Sampler.__call__` does no per-row Python work.
    """

    params: list[SamplingParams]
    # Per row: a generator owned by the request when it has a seed (on the logits' device),
    # else None to draw from the sampler's shared generator.
    generators: list[torch.Generator | None]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    eos_token_ids: Collection[int] = ()
    # Structured output: the rows under a grammar and their allowed tokens [len(grammar_rows), ceil(vocab / 32)]
    # int32 (sample/bitmask.py); None when no row is constrained, and then nothing is built or applied.
    grammar_rows: list[int] = field(default_factory=list)
    grammar_bitmask: torch.Tensor | None = None

    is_all_greedy: bool = field(init=False)
    has_penalties: bool = field(init=False)
    has_min_tokens: bool = field(init=False)
    has_logit_bias: bool = field(init=False)
    # Largest `logprobs` over rows, None when no row asked for logprobs.
    max_num_logprobs: int | None = field(init=False)

    def __post_init__(self) -> None:
        num_rows = len(self.params)
        for name in ("generators", "prompt_token_ids", "output_token_ids"):
            if len(getattr(self, name)) != num_rows:
                raise ValueError(f"{name} must have one entry per row ({num_rows})")
        self.is_all_greedy = all(p.is_greedy for p in self.params)
        self.has_penalties = any(p.has_penalties for p in self.params)
        self.has_min_tokens = any(
            len(out) < p.min_tokens
            for p, out in zip(self.params, self.output_token_ids, strict=True)
        )
        self.has_logit_bias = any(p.has_logit_bias for p in self.params)
        requested = [p.logprobs for p in self.params if p.logprobs is not None]
        self.max_num_logprobs = max(requested) if requested else None

    @property
    def is_plain_greedy(self) -> bool:
        """Whether one argmax over the raw logits is the whole job (the decode hot path)."""
        return (
            self.is_all_greedy
            and not self.has_penalties
            and not self.has_min_tokens
            and not self.has_logit_bias
            and self.max_num_logprobs is None
            and self.grammar_bitmask is None
        )


@dataclass
class SamplerOutput:
    """One sampled token per row, plus the requested logprobs."""

    token_ids: list[int]
    # Per row: None unless the request set `logprobs`; then {token id: logprob} holding the
    # sampled token and the top-`logprobs` tokens, from the raw model logits.
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Turns a batch of logits into one token per row: penalties, masks, greedy or random."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared generator for unseeded rows; None means torch's global RNG.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of `logits` [num_rows, vocab]."""
        num_rows = logits.shape[0]
        if metadata.is_plain_greedy:
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * num_rows)

        # Logprobs are reported from the raw model distribution, before any processing.
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)

        # Private float32 copy: the steps below modify it in place.
        raw_logits = logits
        logits = logits.to(torch.float32, copy=True)
        # The grammar first: every later step (penalties, temperature, top-k/p, min-p, argmax) sees only the
        # tokens it allows.
        if metadata.grammar_bitmask is not None:
            apply_token_bitmask(logits, metadata.grammar_rows, metadata.grammar_bitmask)
        if metadata.has_penalties:
            apply_penalties(logits, metadata)
        if metadata.has_logit_bias:
            apply_logit_bias(logits, metadata)
        if metadata.has_min_tokens:
            apply_min_tokens(logits, metadata)
        repair_non_finite_rows(logits, raw_logits)

        if metadata.is_all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample_mixed(logits, metadata)

        if raw_logprobs is None:
            return SamplerOutput(token_ids.tolist(), [None] * num_rows)
        return gather_logprobs(raw_logprobs, token_ids, metadata)

    def _sample_mixed(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Argmax for greedy rows, random sampling for the others; returns [num_rows] int64."""
        random_rows = [i for i, p in enumerate(metadata.params) if not p.is_greedy]
        if len(random_rows) == len(metadata.params):
            return self._sample_random(logits, metadata.params, metadata.generators)
        token_ids = logits.argmax(dim=-1)  # [num_rows]; kept for the greedy rows
        index = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
        sampled = self._sample_random(
            logits.index_select(0, index),  # [num_random, vocab]
            [metadata.params[i] for i in random_rows],
            [metadata.generators[i] for i in random_rows],
        )
        return token_ids.index_copy_(0, index, sampled)

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Sample one token per row of `logits` [rows, vocab] (modified in place)."""
        probs = processed_probs(logits, params)  # [rows, vocab]
        noise = self._exponential_noise(probs, generators)  # [rows, vocab]
        # Exponential race: argmax(p / q) with q ~ Exp(1) picks token v with probability p_v.
        return probs.div_(noise).argmax(dim=-1)

    def _exponential_noise(
        self, probs: torch.Tensor, generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Exp(1) noise shaped like `probs`, each seeded row drawn from its own generator.

        A seeded row's noise depends only on its generator, never on the other rows in the
        batch, so a seeded request samples the same tokens alone or batched.
        """
        noise = torch.empty_like(probs)  # [rows, vocab]
        seeded = [row for row, gen in enumerate(generators) if gen is not None]
        if not seeded:
            noise.uniform_(generator=self.generator)
        elif len(seeded) < len(generators):
            unseeded = [row for row, gen in enumerate(generators) if gen is None]
            rows = torch.tensor(unseeded, dtype=torch.long, device=probs.device)
            draw = torch.rand(
                len(unseeded), probs.shape[1], generator=self.generator, device=probs.device
            )
            noise.index_copy_(0, rows, draw)
        for row in seeded:
            noise[row].uniform_(generator=generators[row])
        # -log(U) ~ Exp(1), several times faster than exponential_ on CPU. Clamp away from 0
        # in case a backend rounds U up to 1: p / 0 would be NaN, and argmax picks NaN.
        # U == 0 gives inf noise, which just makes that token lose.
        return noise.log_().neg_().clamp_min_(torch.finfo(noise.dtype).tiny)


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Apply repetition, frequency and presence penalties in place to `logits` [rows, vocab]."""
    params = metadata.params
    device = logits.device
    output_counts = token_counts(metadata.output_token_ids, logits.shape[1], device)
    # Which penalties are on is read from the params, not from tensors: no device-to-host sync, and
    # only the per-row values in use are uploaded.
    if any(p.repetition_penalty != 1.0 for p in params):
        # Repetition looks at prompt and output; vLLM's rule: shrink positive logits,
        # push negative ones further down, so the token always becomes less likely.
        repetition = torch.tensor([p.repetition_penalty for p in params], device=device)
        prompt_counts = token_counts(metadata.prompt_token_ids, logits.shape[1], device)
        seen = (prompt_counts > 0) | (output_counts > 0)  # [rows, vocab]
        scale = repetition.unsqueeze(1).expand_as(logits)  # [rows, vocab]
        penalized = torch.where(logits > 0, logits / scale, logits * scale)
        logits.copy_(torch.where(seen, penalized, logits))
    # Frequency scales with how often the token was generated, presence is a flat charge.
    if any(p.frequency_penalty != 0.0 for p in params):
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
        logits -= frequency.unsqueeze(1) * output_counts
    if any(p.presence_penalty != 0.0 for p in params):
        presence = torch.tensor([p.presence_penalty for p in params], device=device)
        logits -= presence.unsqueeze(1) * (output_counts > 0).to(logits.dtype)


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Count each token id per row: [rows, vocab] float32."""
    counts = torch.zeros(len(token_ids), vocab_size, device=device)
    # Flatten to (row, id) pairs so one index_put_ does the whole batch.
    rows = torch.repeat_interleave(
        torch.arange(len(token_ids), device=device),
        torch.tensor([len(ids) for ids in token_ids], device=device),
    )
    cols = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long, device=device)
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=counts.dtype), accumulate=True)
    return counts


def apply_logit_bias(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Add each row's logit_bias, in place, to `logits` [rows, vocab]: the batch's (row, token, bias) triples are
    gathered once and written by one scatter."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, p in enumerate(metadata.params):
        for token_id, bias in (p.logit_bias or {}).items():
            if 0 <= token_id < vocab_size:  # ids were checked against the model's vocabulary already
                rows.append(row)
                cols.append(token_id)
                values.append(bias)
    if not rows:
        return
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


# Stands in for +inf: beats any real logit, and stays finite after division by the smallest temperature (1e-5).
_POSINF_STANDIN = 1e30


def repair_non_finite_rows(logits: torch.Tensor, raw_logits: torch.Tensor) -> None:
    """Make processed `logits` [rows, vocab] safe to sample, in place, without reading anything back.

    A processor can break a row: a tiny repetition penalty divides by a float32 zero (+inf, then NaN in the
    softmax), a mask can forbid every token. NaN becomes a forbidden token, +inf a huge finite logit (an
    infinitely preferred token stays preferred, the softmax stays finite), and a row left with no allowed token
    falls back to its raw model logits, so no row ever samples from NaN.
    """
    logits.nan_to_num_(nan=float("-inf"), posinf=_POSINF_STANDIN, neginf=float("-inf"))
    is_empty = logits.amax(dim=-1, keepdim=True) == float("-inf")  # [rows, 1]
    torch.where(is_empty, raw_logits.to(logits.dtype), logits, out=logits)


def apply_min_tokens(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Forbid EOS and stop token ids, in place, for rows still short of min_tokens."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for row, (p, out) in enumerate(zip(metadata.params, metadata.output_token_ids, strict=True)):
        if len(out) >= p.min_tokens:
            continue
        # With ignore_eos the EOS token does not end the request, so it need not be masked.
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids.update(metadata.eos_token_ids)
        for token_id in stop_ids:
            if 0 <= token_id < vocab_size:
                rows.append(row)
                cols.append(token_id)
    if rows:
        logits[rows, cols] = float("-inf")


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for random rows; returns probs [rows, vocab]."""
    device = logits.device
    vocab_size = logits.shape[1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits.div_(temperature.unsqueeze(1))

    # top_k of -1 or 0 means off; k >= vocab keeps everything as well.
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p for p in params]
    use_top_k = any(k < vocab_size for k in top_k)
    use_top_p = any(p < 1.0 for p in top_p)
    if use_top_k or use_top_p:
        k = torch.tensor(top_k, device=device)
        p = torch.tensor(top_p, device=device) if use_top_p else None
        apply_top_k_top_p(logits, k, p, max(top_k))

    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        # Drop tokens less likely than min_p times the most likely one; renormalize.
        threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [rows, 1]
        probs.masked_fill_(probs < threshold, 0.0)
        probs.div_(probs.sum(dim=-1, keepdim=True))
    return probs


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None, max_k: int
) -> None:
    """Mask, in place, logits [rows, vocab] outside each row's top-k and top-p set.

    `top_k` [rows] holds vocab for rows without a limit (`max_k` is its largest value, passed
    from the host so that no sync reads it back), `top_p` [rows] holds 1.0 for rows without one.
    Each row keeps the tokens whose logit is >= a per-row threshold, found in the sorted
    candidates: ties with the threshold survive, and no scatter back is needed.
    """
    vocab_size = logits.shape[1]
    # Candidates in descending order: a partial top-k when every row has a limit (much cheaper
    # than sorting the vocab), else a full sort. A row's leading candidates are the same either
    # way, so a seeded row's result does not depend on the batch around it.
    if max_k < vocab_size:
        values = logits.topk(max_k, dim=-1, sorted=True).values  # [rows, max_k]
    else:
        values = logits.sort(dim=-1, descending=True).values  # [rows, vocab]
    num_kept = top_k  # [rows]
    if top_p is not None:
        num_kept = torch.minimum(num_kept, _top_p_count(values, top_k, top_p))
    threshold = values.gather(1, (num_kept - 1).unsqueeze(1))  # [rows, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))


def _top_p_count(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the size of the smallest prefix of `values` (descending) with mass >= top_p."""
    position = torch.arange(values.shape[1], device=values.device)  # [num_candidates]
    in_top_k = position.unsqueeze(0) < top_k.unsqueeze(1)  # [rows, num_candidates]
    # Unnormalized probabilities within the top-k set; the total is the last prefix sum.
    weights = torch.exp(values - values[:, :1]).masked_fill_(~in_top_k, 0.0)
    cumulative = weights.cumsum(dim=-1)  # [rows, num_candidates]
    total = cumulative.gather(1, (top_k - 1).unsqueeze(1))  # [rows, 1]
    # A candidate is kept while the mass strictly before it is still below p.
    mass_before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))  # [rows, num_candidates]
    count = ((mass_before < top_p.unsqueeze(1) * total) & in_top_k).sum(dim=-1)
    # Rows with top_p == 1 keep their whole top-k, even tokens too small to move the sum.
    return torch.where(top_p < 1.0, count.clamp_min(1), top_k)


def gather_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, metadata: SamplingMetadata
) -> SamplerOutput:
    """The sampled tokens and, per row, {sampled token: logprob} plus the row's top-`logprobs`
    tokens (None for rows that asked for none), read back to the host in one transfer."""
    max_num = metadata.max_num_logprobs or 0
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))  # [rows, 1]
    top_values, top_ids = raw_logprobs.topk(max_num, dim=-1)  # [rows, max_num]
    # float64 holds every token id and float32 logprob exactly: one tensor, one copy to the host.
    parts = (token_ids.unsqueeze(1), top_ids, sampled, top_values)
    packed = torch.cat([part.to(torch.float64) for part in parts], dim=1).tolist()  # [rows, 2 + 2 * max_num]
    token_list: list[int] = []
    result: list[dict[int, float] | None] = []
    for row, p in zip(packed, metadata.params, strict=True):
        token_id, ids, token_logprob, values = (int(row[0]), row[1:1 + max_num], row[1 + max_num],
                                                row[2 + max_num:])
        token_list.append(token_id)
        if p.logprobs is None:
            result.append(None)
            continue
        entry = {int(i): v for i, v in zip(ids[: p.logprobs], values[: p.logprobs], strict=True)}
        entry[token_id] = token_logprob
        result.append(entry)
    return SamplerOutput(token_list, result)
