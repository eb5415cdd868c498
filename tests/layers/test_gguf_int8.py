"""The 8-bit-activation GGUF kernels (native/gguf_int8.c) against the same math in float64 (x rounded to 8 bits
per 32 values, times gguf-py's dequantized W), and how far that rounding moves a product from the exact one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gguf import GGMLQuantizationType
from test_gguf_kernels import SHAPES, random_weight

from kvserve.layers import gguf_ops
from kvserve.layers.embedding import VocabEmbedding
from kvserve.layers.linear import Linear
from kvserve.layers.quantization.gguf import DEQUANTIZED_GEMM_ROWS, GgufLinearMethod
from kvserve.loader.gguf import GgufTensor

pytestmark = pytest.mark.skipif(not gguf_ops.available(), reason="no C compiler: the GGUF kernels cannot build")

Q = GGMLQuantizationType
BLOCK_FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
INTERLEAVED = list(gguf_ops.INTERLEAVED_HEADERS)  # Q4_0, Q4_1, Q8_0: the 8-bit path keeps them in tiles of 8 rows


def _matches_reference(matmul: Callable[..., None], kernel_weight: torch.Tensor, weight: torch.Tensor,
                       qtype: GGMLQuantizationType, rows: int, num_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` rows of x of different magnitudes through `matmul` (reading `kernel_weight`), held to the float64
    product of the same 8-bit blocks and gguf-py's dequantized `weight`; returns x and the result."""
    x = torch.randn(rows, num_in) * torch.rand(rows, 1) * 4
    y = torch.empty(rows, weight.shape[0])
    blocks = gguf_ops.quantize_activations(x)
    matmul(blocks, kernel_weight, qtype, y)
    expected = gguf_ops.reference_int8_matmul(blocks, weight, qtype)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(),
                               msg=lambda m, s=(rows, num_in, weight.shape[0]): f"{s}: {m}")
    return x, y


@pytest.mark.parametrize("qtype", BLOCK_FORMATS, ids=lambda t: t.name)
def test_int8_matmul_matches_its_reference(qtype: GGMLQuantizationType, num_threads: int) -> None:
    for num_in, num_out in SHAPES:
        weight = random_weight(qtype, num_out, num_in)
        for rows in (1, 2, 5, 7, 16):  # every remainder of the four-row passes
            x, y = _matches_reference(gguf_ops.int8_matmul, weight, weight, qtype, rows, num_in)
            # The price of the 8-bit rounding, against the float32-activation product: about 0.5% of the
            # products' own size sqrt(sum_j (w_j x_j)^2) (a sum that cancels can lose more of itself).
            exact = gguf_ops.reference_matmul(x, weight, qtype)
            dense = gguf_ops.dequantize_weight(weight, qtype, num_in)
            size = ((x.double() ** 2) @ (dense.double() ** 2).t()).sqrt()
            assert ((y - exact).abs() <= 0.03 * size).all()


@pytest.mark.parametrize("qtype", INTERLEAVED, ids=lambda t: t.name)
def test_interleaved_kernels_match_their_reference(qtype: GGMLQuantizationType, num_threads: int) -> None:
    for num_in, num_out in ((32, 8), (96, 24), (512, 96), (1536, 40)):  # one block, one tile; odd counts of both
        weight = random_weight(qtype, num_out, num_in)
        tiles = gguf_ops.interleave_rows8(weight, qtype)
        assert not torch.equal(tiles, weight) and torch.equal(gguf_ops.deinterleave_rows8(tiles, qtype), weight)
        for rows in (1, 3, 8, 9, 15, 20):  # alone, remainders of the 8-row and paired 4-row passes, whole ones
            _matches_reference(gguf_ops.interleaved_int8_matmul, tiles, weight, qtype, rows, num_in)


@pytest.mark.parametrize("interleaved", [False, True], ids=["row-major", "interleaved"])
@pytest.mark.parametrize("qtype", BLOCK_FORMATS, ids=lambda t: t.name)
def test_a_row_gives_the_same_bits_whatever_rows_run_beside_it(qtype: GGMLQuantizationType,
                                                               interleaved: bool) -> None:
    """Batch invariance: a decode row and the same row verifying drafts among others round alike, so greedy
    output with speculation is the output without it by construction."""
    if interleaved and qtype not in INTERLEAVED:
        pytest.skip(f"{qtype.name} has no interleaved layout")
    num_in, num_out, num_rows = 512, 96, 19  # every slot of the 4- and 8-row passes, and their remainders
    weight = random_weight(qtype, num_out, num_in)
    if interleaved:
        weight = gguf_ops.interleave_rows8(weight, qtype)
    matmul = gguf_ops.interleaved_int8_matmul if interleaved else gguf_ops.int8_matmul
    blocks = gguf_ops.quantize_activations(torch.randn(num_rows, num_in))
    alone = torch.empty(num_rows, num_out)
    for row in range(num_rows):
        matmul(blocks[row:row + 1], weight, qtype, alone[row:row + 1])
    for first in range(num_rows):
        together = torch.empty(num_rows - first, num_out)
        matmul(blocks[first:], weight, qtype, together)
        assert torch.equal(together, alone[first:]), f"rows {first}-{num_rows - 1} together"


def test_activation_blocks_round_each_value_to_its_nearest_code() -> None:
    x = torch.randn(7, 512) * torch.logspace(-3, 3, 7)[:, None]
    blocks = gguf_ops.quantize_activations(x)
    codes = blocks[..., :32].contiguous().view(torch.int8).long()
    scales = blocks[..., 32:36].contiguous().view(torch.float32)
    half_sums = blocks[..., 36:44].contiguous().view(torch.float32)  # scale * the codes' sum, per 16 values
    grouped = x.view(7, 16, 32)
    torch.testing.assert_close(scales, grouped.abs().amax(-1, keepdim=True) / 127)
    assert (codes.abs().amax(-1) == 127).all()  # the largest value of a block maps to +-127
    # Each value is within half a step (plus float rounding) of its code.
    assert ((grouped / scales - codes).abs() <= 0.5 + 1e-4).all()
    torch.testing.assert_close(half_sums, scales * codes.view(7, 16, 2, 16).sum(-1).float())


def test_zero_rows_give_zero() -> None:
    weight = random_weight(Q.Q4_1, 8, 256)
    y = torch.empty(2, 8)
    gguf_ops.int8_matmul(gguf_ops.quantize_activations(torch.zeros(2, 256)), weight, Q.Q4_1, y)
    assert torch.equal(y, torch.zeros(2, 8))


def _int8_layer(shards: list[tuple[GGMLQuantizationType, int]]) -> tuple[Linear, list[torch.Tensor]]:
    """A fused Linear(256 -> sum of rows) with 8-bit activations, loaded shard by shard with random blocks."""
    layer = Linear(256, sum(rows for _, rows in shards), output_sizes=[rows for _, rows in shards])
    layer.set_method(GgufLinearMethod(int8_activations=True))
    weights = [random_weight(qtype, rows, 256, seed=i) for i, (qtype, rows) in enumerate(shards)]
    for shard_id, ((qtype, rows), weight) in enumerate(zip(shards, weights, strict=True)):
        layer.weight.weight_loader(layer.weight, GgufTensor(weight, qtype, (rows, 256)), shard_id)
    layer.process_weights_after_loading()
    return layer, weights


def test_method_with_int8_activations_on_mixed_shards() -> None:
    layer, weights = _int8_layer([(Q.Q4_K, 64), (Q.Q6_K, 32), (Q.F16, 16)])  # F16 keeps float32 activations
    x = torch.randn(3, 256)
    blocks = gguf_ops.quantize_activations(x)
    expected = torch.cat([gguf_ops.reference_int8_matmul(blocks, weights[0], Q.Q4_K),
                          gguf_ops.reference_int8_matmul(blocks, weights[1], Q.Q6_K),
                          gguf_ops.reference_matmul(x, weights[2], Q.F16)], dim=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_method_interleaves_what_it_can_and_keeps_every_path_exact() -> None:
    """A fused Q4_1 + Q8_0 + Q4_0 layer: the runs of 8k rows are interleaved in place (the file's bytes, no
    copy) and take the 8-bit kernels at any row count; the ragged Q4_0 run stays row-major, and long chunks
    dequantize it (panels of the file's rows) and multiply in float32."""
    shards = [(Q.Q4_1, 64), (Q.Q8_0, 32), (Q.Q4_0, 12)]
    layer, weights = _int8_layer(shards)
    assert [run.interleaved for run in layer.weight.segments] == [True, True, False]
    assert layer.weight.numel() == sum(weight.numel() for weight in weights)
    for rows in (1, 9):
        x = torch.randn(rows, 256)
        blocks = gguf_ops.quantize_activations(x)
        expected = torch.cat([gguf_ops.reference_int8_matmul(blocks, weight, qtype)
                              for (qtype, _), weight in zip(shards, weights, strict=True)], dim=1)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    x = torch.randn(DEQUANTIZED_GEMM_ROWS, 256)
    blocks = gguf_ops.quantize_activations(x)
    expected = torch.cat([gguf_ops.reference_int8_matmul(blocks, weights[0], Q.Q4_1),
                          gguf_ops.reference_int8_matmul(blocks, weights[1], Q.Q8_0),
                          gguf_ops.reference_matmul(x, weights[2], Q.Q4_0)], dim=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("qtype", INTERLEAVED, ids=lambda t: t.name)
def test_an_interleaved_embedding_looks_up_the_files_rows(qtype: GGMLQuantizationType) -> None:
    embedding = VocabEmbedding(40, 64)
    embedding.set_method(GgufLinearMethod(int8_activations=True))
    weight = random_weight(qtype, 40, 64)
    embedding.weight.weight_loader(embedding.weight, GgufTensor(weight, qtype, (40, 64)), None)
    embedding.process_weights_after_loading()
    assert embedding.weight.segments[0].interleaved
    ids = torch.tensor([[0, 39, 8, 8], [17, 1, 30, 7]])
    expected = gguf_ops.dequantize_weight(weight, qtype, 64)[ids]
    assert torch.equal(embedding(ids), expected)
    with pytest.raises(IndexError, match=r"out of range \[0, 40\)"):
        embedding(torch.tensor([40]))
