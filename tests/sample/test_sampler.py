"""Sampler: greedy, top-k/top-p/min-p, penalties, seeds, distribution, logprobs, min_tokens."""

from __future__ import annotations

import torch

from kvserve.sample.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    processed_probs,
)
from kvserve.sampling_params import SamplingParams


def make_metadata(
    params: list[SamplingParams],
    seeds: list[int | None] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> SamplingMetadata:
    """Metadata with fresh generators for the given seeds (None: unseeded)."""
    num_rows = len(params)
    seeds = seeds if seeds is not None else [p.seed for p in params]
    generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    return SamplingMetadata(
        params=params,
        generators=generators,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(num_rows)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(num_rows)],
        eos_token_ids=eos_token_ids,
    )


def random_logits(num_rows: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Reproducible logits [num_rows, vocab_size] with a realistic spread."""
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_on_fast_path() -> None:
    logits = random_logits(6, 100)
    metadata = make_metadata([SamplingParams(temperature=0.0)] * 6)
    assert metadata.is_plain_greedy
    out = Sampler()(logits, metadata)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_mixed_batch_greedy_rows_take_argmax_and_input_is_untouched() -> None:
    logits = random_logits(4, 50)
    before = logits.clone()
    params = [SamplingParams(temperature=t) for t in (0.0, 1.0, 0.0, 0.8)]
    out = Sampler(torch.Generator().manual_seed(1))(logits, make_metadata(params))
    argmax = logits.argmax(dim=-1).tolist()
    assert out.token_ids[0] == argmax[0] and out.token_ids[2] == argmax[2]
    assert torch.equal(logits, before)


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(8, 200, seed=3)
    params = [SamplingParams(temperature=1.0, top_k=1)] * 8
    for seed in range(5):
        out = Sampler(torch.Generator().manual_seed(seed))(logits, make_metadata(params))
        assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_max() -> None:
    logits = random_logits(8, 200, seed=4)
    params = [SamplingParams(temperature=1.5, top_p=1e-6)] * 8
    probs = processed_probs(logits.clone(), params)
    assert torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1))
    assert torch.all((probs > 0).sum(dim=-1) == 1)
    out = Sampler(torch.Generator().manual_seed(0))(logits, make_metadata(params))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = processed_probs(probs.log(), [SamplingParams(top_p=0.7)])
    # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7: the two most likely tokens survive, renormalized.
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_top_k_renormalizes_over_k_tokens() -> None:
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    kept = processed_probs(probs.log(), [SamplingParams(top_k=2)])
    torch.testing.assert_close(kept, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))


def test_min_p_masks_unlikely_tokens() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # Threshold 0.5 * 0.5 = 0.25: tokens 2 and 3 go.
    kept = processed_probs(probs.log(), [SamplingParams(min_p=0.5)])
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    logits = probs.log().expand(2000, 4)
    params = [SamplingParams(min_p=0.5)] * 2000
    out = Sampler(torch.Generator().manual_seed(0))(logits, make_metadata(params))
    assert set(out.token_ids) == {0, 1}


def test_penalties_exact_math() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    metadata = make_metadata([params], prompts=[[0, 1]], outputs=[[1, 3, 3]])
    apply_penalties(logits, metadata)
    expected = torch.tensor(
        [
            [
                2.0 / 2.0,  # in prompt, positive: divided
                -1.0 * 2.0 - 0.5 * 1 - 0.25,  # in prompt and output once, negative: multiplied
                0.5,  # never seen
                3.0 / 2.0 - 0.5 * 2 - 0.25,  # generated twice
                -2.0,  # never seen
            ]
        ]
    )
    torch.testing.assert_close(logits, expected)


def test_penalties_apply_per_row() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    metadata = make_metadata(params, outputs=[[2, 2], [2, 2]])
    apply_penalties(logits, metadata)
    torch.testing.assert_close(logits, torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, 1.0]]))


def test_greedy_with_penalties_uses_penalized_logits() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5)]
    out = Sampler()(logits, make_metadata(params, prompts=[[0]]))
    assert out.token_ids == [1]


def run_steps(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None], num_steps: int
) -> list[list[int]]:
    """Sample `num_steps` times, keeping each row's generator across steps like a runner."""
    metadata = make_metadata(params, seeds=seeds)
    sampler = Sampler()
    return [sampler(logits, metadata).token_ids for _ in range(num_steps)]


def test_seeded_row_is_batch_invariant() -> None:
    vocab_size = 500
    target = random_logits(1, vocab_size, seed=7)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=123)
    alone = [step[0] for step in run_steps(target, [params], [123], num_steps=6)]

    others = random_logits(4, vocab_size, seed=8)
    batch = torch.cat([others[:2], target, others[2:]])  # the seeded row at position 2
    batch_params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        params,
        SamplingParams(temperature=0.5, seed=99),
        SamplingParams(temperature=1.3, min_p=0.1, presence_penalty=1.0),
    ]
    seeds = [None, None, 123, 99, None]
    batched = [step[2] for step in run_steps(batch, batch_params, seeds, num_steps=6)]
    assert batched == alone

    # And at the last position of a different batch.
    batch2 = torch.cat([others[3:], target])
    params2 = [SamplingParams(temperature=2.0, seed=5), params]
    batched2 = [step[1] for step in run_steps(batch2, params2, [5, 123], num_steps=6)]
    assert batched2 == alone


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any two seeds agreeing 10 times is ~1e-30
    params = [SamplingParams(temperature=1.0)]
    first = run_steps(logits, params, [1], num_steps=10)
    second = run_steps(logits, params, [2], num_steps=10)
    again = run_steps(logits, params, [1], num_steps=10)
    assert first != second
    assert first == again


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed `counts` against expected `probs`."""
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_distribution_follows_softmax() -> None:
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    num_samples = 20000
    logits = base.expand(num_samples, -1)
    for temperature in (1.0, 0.5):
        params = [SamplingParams(temperature=temperature)] * num_samples
        # A fixed-seed shared generator makes the test deterministic, so it cannot flake.
        sampler = Sampler(torch.Generator().manual_seed(1234))
        tokens = torch.tensor(sampler(logits, make_metadata(params)).token_ids)
        counts = torch.bincount(tokens, minlength=8).float()
        probs = torch.softmax(base / temperature, dim=-1)
        # 7 degrees of freedom: the 99.9% quantile is about 24.3.
        assert chi_square(counts, probs) < 24.3


def test_logprobs_are_raw_log_softmax_with_sampled_and_top_n() -> None:
    logits = random_logits(3, 40, seed=11)
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        SamplingParams(temperature=0.7, logprobs=3, presence_penalty=1.5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logprobs=0),
    ]
    metadata = make_metadata(params, outputs=[[int(logits[0].argmax())], [], []])
    out = Sampler(torch.Generator().manual_seed(0))(logits, metadata)

    assert out.logprobs[1] is None
    top3 = raw[0].topk(3).indices.tolist()
    first = out.logprobs[0]
    assert first is not None
    assert set(first) == set(top3) | {out.token_ids[0]}
    for token_id, value in first.items():
        assert abs(value - raw[0, token_id].item()) < 1e-6
    assert out.logprobs[2] == {out.token_ids[2]: raw[2, out.token_ids[2]].item()}


def test_min_tokens_blocks_eos_and_stop_token_ids() -> None:
    eos, stop_id = 5, 7
    logits = torch.zeros(1, 10)
    logits[0, eos] = 10.0
    logits[0, stop_id] = 9.0
    logits[0, 2] = 1.0
    params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id])]

    short = make_metadata(params, outputs=[[1, 1]], eos_token_ids=(eos,))
    assert Sampler()(logits, short).token_ids == [2]
    done = make_metadata(params, outputs=[[1, 1, 1]], eos_token_ids=(eos,))
    assert Sampler()(logits, done).token_ids == [eos]

    random_params = [SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[stop_id])]
    logits_many = logits.expand(500, -1)
    metadata = make_metadata(random_params * 500, eos_token_ids=(eos,))
    tokens = set(Sampler(torch.Generator().manual_seed(0))(logits_many, metadata).token_ids)
    assert eos not in tokens and stop_id not in tokens

    # With ignore_eos, EOS does not end the request, so only the stop id is masked.
    ignore = [SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)]
    assert Sampler()(logits, make_metadata(ignore, eos_token_ids=(eos,))).token_ids == [eos]


READ_BACKS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_one_read_back_to_the_host_per_step(monkeypatch) -> None:
    """Whatever the mix of parameters, sampling reads device values back once (on a GPU, one sync)."""
    calls: list[str] = []

    def counting(name: str):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            calls.append(name)
            return real(self, *args, **kwargs)
        return counted

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    mixes = [
        [SamplingParams(temperature=0)],
        [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.8, seed=1)],
        [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                        frequency_penalty=0.5, presence_penalty=0.3, logprobs=2, min_tokens=4),
         SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(temperature=1.0, top_p=0.5)],
    ]
    for params in mixes:
        metadata = make_metadata(params, prompts=[[1, 2]] * len(params), outputs=[[3]] * len(params),
                                 eos_token_ids=(7,))
        calls.clear()
        Sampler(torch.Generator().manual_seed(0))(random_logits(len(params), 50), metadata)
        assert calls == ["tolist"], params
