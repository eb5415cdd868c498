"""Sampler: logit_bias per row, and the guard against rows a processor left non-finite."""

from __future__ import annotations

import pytest
import torch

from kvserve.sample import sampler as sampler_module
from kvserve.sample.sampler import Sampler, SamplingMetadata
from kvserve.sampling_params import SamplingParams

VOCAB = 64


def metadata_for(params: list[SamplingParams], prompts: list[list[int]] | None = None) -> SamplingMetadata:
    """Unseeded rows, no outputs yet; `prompts` feed the repetition penalty."""
    rows = len(params)
    return SamplingMetadata(params, [None] * rows, prompts or [[] for _ in range(rows)], [[] for _ in range(rows)])


def logits_of(rows: int, seed: int = 0) -> torch.Tensor:
    """Reproducible logits [rows, VOCAB] whose argmax is never token 0 (a NaN argmax lands on 0)."""
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    logits[:, 0] = -50.0
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], seed: int = 0, **kwargs) -> list[int]:
    return Sampler(torch.Generator().manual_seed(seed))(logits, metadata_for(params, **kwargs)).token_ids


def test_plus_100_forces_a_token_under_greedy_and_sampling() -> None:
    logits = logits_of(2)
    target = int(logits[0].argmin())  # the least likely token
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, logit_bias={target: 100})] * 2
        for seed in range(5):
            assert sample(logits, params, seed) == [target, target]


def test_minus_100_on_the_greedy_token_changes_the_choice() -> None:
    logits = logits_of(1)
    ranked = logits[0].argsort(descending=True).tolist()
    params = [SamplingParams(temperature=0, logit_bias={ranked[0]: -100})]
    assert sample(logits, params) == [ranked[1]]


def test_rows_without_bias_are_unchanged_in_a_mixed_batch() -> None:
    logits = logits_of(4, seed=3)
    before = logits.clone()
    argmax = logits.argmax(dim=-1).tolist()
    seeded = SamplingParams(temperature=0.9, seed=11)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={5: 100}), seeded,
              SamplingParams(temperature=0.9, seed=12, logit_bias={7: 100, 8: -100})]
    metadata = metadata_for(params)
    metadata.generators = [None, None, torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    assert metadata.has_logit_bias and not metadata.is_plain_greedy
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, metadata).token_ids
    alone = Sampler()(logits[2:3], SamplingMetadata([seeded], [torch.Generator().manual_seed(11)], [[]], [[]]))
    assert tokens == [argmax[0], 5, alone.token_ids[0], 7]
    assert torch.equal(logits, before)  # the caller's logits are never modified


def test_bias_adds_to_the_logit_and_logprobs_stay_raw() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 2.0
    params = [SamplingParams(temperature=0, logit_bias={9: 2.5}, logprobs=1)]
    out = Sampler()(logits, metadata_for(params))
    assert out.token_ids == [9]  # 0 + 2.5 beats 2.0
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs[0][9] == pytest.approx(raw[9].item())  # reported before processing, like vLLM


def test_no_bias_keeps_the_plain_greedy_fast_path() -> None:
    assert metadata_for([SamplingParams(temperature=0, logit_bias={})]).is_plain_greedy
    assert not metadata_for([SamplingParams(temperature=0, logit_bias={1: 1})]).is_plain_greedy


def test_tiny_repetition_penalty_picks_a_seen_token_never_garbage() -> None:
    # 1e-300 is 0 in float32: seen tokens with positive logits go to +inf, which used to turn the whole
    # softmax into NaN. The guard keeps the limit's meaning: those tokens win.
    logits = logits_of(1, seed=5)
    seen = [int(i) for i in logits[0].argsort()[-6:-3]]  # positive logits, not the argmax
    assert all(logits[0, i] > 0 for i in seen)
    for temperature in (0.0, 0.7, 1.0):
        params = [SamplingParams(temperature=temperature, repetition_penalty=1e-300)]
        for seed in range(8):
            token = sample(logits, params, seed, prompts=[seen])[0]
            assert token in seen


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_left_all_nan_or_all_minus_inf_falls_back_to_the_raw_argmax(monkeypatch, temperature) -> None:
    """A probe processor breaks rows 1 and 2; row 0 and the other rows' results must not notice."""
    def breaking_processor(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
        logits[1] = float("nan")
        logits[2] = float("-inf")
        logits[3, 4] = float("nan")  # one NaN token: only that token is lost

    monkeypatch.setattr(sampler_module, "apply_penalties", breaking_processor)
    logits = logits_of(4, seed=9)
    logits[3, 4] = 100.0  # would win, but the probe made it NaN
    params = [SamplingParams(temperature=temperature, top_k=1, presence_penalty=0.5)] * 4
    tokens = sample(logits, params)
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[:3] == argmax[:3]
    assert tokens[3] == int(logits[3].topk(2).indices[1])


def test_bias_and_guard_add_no_read_back(monkeypatch) -> None:
    """The bias scatter and the guard run on the device: still one read back per step (one sync on a GPU)."""
    calls: list[str] = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(self, *a, **k))[1])
    params = [SamplingParams(temperature=0, logit_bias={3: 5}),
              SamplingParams(temperature=0.8, repetition_penalty=1e-300, logit_bias={4: -5, 6: 1})]
    Sampler(torch.Generator().manual_seed(0))(logits_of(2), metadata_for(params, prompts=[[1], [2, 3]]))
    assert calls == ["tolist"]
