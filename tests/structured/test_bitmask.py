"""The sampler's grammar hook: packed bitmasks applied before every other step, only to their rows."""

from __future__ import annotations

import torch

from kvserve import SamplingParams
from kvserve.sample.bitmask import apply_token_bitmask, unpack_bitmask
from kvserve.sample.sampler import Sampler, SamplingMetadata

VOCAB = 70  # not a multiple of 32: the last word is partly padding


def pack(allowed: list[set[int]], vocab: int = VOCAB) -> torch.Tensor:
    """llguidance's layout: bit j of word w allows token 32 * w + j; [rows, ceil(vocab / 32)] int32."""
    words = (vocab + 31) // 32
    bitmask = torch.zeros(len(allowed), words, dtype=torch.int64)
    for row, tokens in enumerate(allowed):
        for token in tokens:
            bitmask[row, token // 32] |= 1 << (token % 32)
    return bitmask.to(torch.int32)  # wraps bit 31 to the sign bit, as the int32 buffer llguidance fills does


def test_unpack_matches_the_layout_including_bit_31_and_padding() -> None:
    allowed = [{0, 31, 32, 63, 69}, set(range(VOCAB))]
    unpacked = unpack_bitmask(pack(allowed), VOCAB)
    assert unpacked.shape == (2, VOCAB)
    for row, tokens in enumerate(allowed):
        assert set(torch.nonzero(unpacked[row]).flatten().tolist()) == tokens
    # A model vocabulary wider than the tokenizer's mask: the extra ids are never allowed.
    wider = unpack_bitmask(pack([set(range(64))], 64), 80)
    assert wider.shape == (1, 80) and wider[0, :64].all() and not wider[0, 64:].any()


def test_apply_touches_only_listed_rows() -> None:
    logits = torch.randn(3, VOCAB)
    original = logits.clone()
    apply_token_bitmask(logits, [2], pack([{5, 40}]))
    assert torch.equal(logits[:2], original[:2])
    finite = torch.isfinite(logits[2]).nonzero().flatten().tolist()
    assert finite == [5, 40] and torch.equal(logits[2, [5, 40]], original[2, [5, 40]])


def _metadata(params: list[SamplingParams], rows: list[int] | None = None,
              bitmask: torch.Tensor | None = None) -> SamplingMetadata:
    generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    metadata = SamplingMetadata(params, generators, [[1, 2, 3]] * len(params), [[4, 5]] * len(params),
                                eos_token_ids={0})
    if bitmask is not None:
        metadata.grammar_rows, metadata.grammar_bitmask = rows, bitmask
    return metadata


def test_masked_rows_sample_only_allowed_tokens_with_every_parameter() -> None:
    torch.manual_seed(0)
    allowed = {3, 4, 5, 33, 64}
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, top_k=2, seed=1),
        SamplingParams(temperature=0.7, top_p=0.5, seed=2),
        SamplingParams(temperature=1.0, min_p=0.3, seed=3),
        SamplingParams(temperature=0.9, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=-1.0,
                       seed=4),
        SamplingParams(temperature=1.0, min_tokens=5, seed=5, logprobs=2),
    ]
    sampler = Sampler(torch.Generator().manual_seed(0))
    for _ in range(20):
        logits = torch.randn(len(params), VOCAB) * 4
        output = sampler(logits, _metadata(params, list(range(len(params))), pack([allowed] * len(params))))
        assert set(output.token_ids) <= allowed
        # Logprobs stay the raw model distribution, not the masked one.
        raw = torch.log_softmax(logits[5], dim=-1)
        token = output.token_ids[5]
        assert abs(output.logprobs[5][token] - raw[token].item()) < 1e-5


def test_unmasked_rows_are_unchanged_by_masked_neighbours() -> None:
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7),
              SamplingParams(temperature=1.0, top_p=0.8, seed=8)]
    logits = torch.randn(3, VOCAB)
    alone = Sampler()(logits.clone(), _metadata(params))
    # Row 1 is constrained to one token; rows 0 and 2 must sample what they sampled without it.
    mixed = Sampler()(logits.clone(), _metadata(params, [1], pack([{9}])))
    assert mixed.token_ids[1] == 9
    assert [mixed.token_ids[0], mixed.token_ids[2]] == [alone.token_ids[0], alone.token_ids[2]]


def test_plain_greedy_fast_path_only_without_a_mask() -> None:
    params = [SamplingParams(temperature=0)] * 2
    assert _metadata(params).is_plain_greedy
    metadata = _metadata(params, [0], pack([{1}]))
    assert not metadata.is_plain_greedy
    logits = torch.zeros(2, VOCAB)
    logits[:, 10] = 5.0  # the unmasked argmax
    assert Sampler()(logits, metadata).token_ids == [1, 10]
