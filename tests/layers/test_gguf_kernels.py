"""The GGUF kernels (native/gguf_matmul.c) against gguf-py's dequantization of the same bytes: every block
format, odd sizes, one to many rows, one and two threads; and the GGUF linear method on fused, mixed shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kvserve.layers import gguf_ops
from kvserve.layers.embedding import VocabEmbedding
from kvserve.layers.linear import Linear
from kvserve.layers.quantization import gguf as gguf_method
from kvserve.layers.quantization.gguf import DEQUANTIZED_GEMM_ROWS, GgufLinearMethod
from kvserve.loader.gguf import GgufTensor

pytestmark = pytest.mark.skipif(not gguf_ops.available(), reason="no C compiler: the GGUF kernels cannot build")

Q = GGMLQuantizationType
# Byte offsets of each block's float16 scales (d, m / dmin); random bytes elsewhere are valid codes.
HALF_OFFSETS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2],
                Q.Q5_K: [0, 2], Q.Q6_K: [208]}
FORMATS = [Q.F32, Q.F16, *HALF_OFFSETS]
SHAPES = [(256, 1), (256, 37), (512, 96), (1536, 5)]  # (in, out): in is whole super-blocks; odd row counts
ROWS = [1, 2, 5, 8, 15]  # one row, leftovers of the eight-row passes (2, 5, 7), and whole ones


def random_weight(qtype: GGMLQuantizationType, num_out: int, num_in: int, seed: int = 0) -> torch.Tensor:
    """[num_out, row_bytes] uint8 of valid blocks: random codes with small random float16 scales."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.F32, Q.F16):
        values = rng.standard_normal((num_out, num_in)).astype(np.float32 if qtype == Q.F32 else np.float16)
        return torch.from_numpy(values.view(np.uint8))
    values_per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (num_out, num_in // values_per_block, block_bytes), dtype=np.uint8)
    for offset in HALF_OFFSETS[qtype]:
        scales = (rng.standard_normal(blocks.shape[:2]) * 0.05).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return torch.from_numpy(blocks.reshape(num_out, -1))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_matches_dequantized_reference(qtype: GGMLQuantizationType, num_threads: int) -> None:
    for num_in, num_out in SHAPES:
        weight = random_weight(qtype, num_out, num_in)
        for rows in ROWS:
            x = torch.randn(rows, num_in)
            y = torch.empty(rows, num_out)
            gguf_ops.matmul(x, weight, qtype, y)
            expected = gguf_ops.reference_matmul(x, weight, qtype)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                                       msg=lambda m, s=(rows, num_in, num_out): f"{s}: {m}")


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_row_lookup_is_the_reference_dequantization_exactly(qtype: GGMLQuantizationType) -> None:
    weight = random_weight(qtype, 70, 512, seed=1)
    ids = torch.tensor([69, 0, 3, 3])
    dense = gguf_ops.dequantize_weight(weight, qtype, 512)
    assert torch.equal(gguf_ops.dequantize_rows(weight, qtype, ids, 512), dense[ids])
    with pytest.raises(IndexError, match=r"token id out of range \[0, 70\)"):
        gguf_ops.dequantize_rows(weight, qtype, torch.tensor([70]), 512)


def test_output_columns_of_a_wider_matrix_are_written_in_place() -> None:
    weight = random_weight(Q.Q4_K, 8, 256)
    x = torch.randn(3, 256)
    y = torch.full((3, 20), 7.0)
    gguf_ops.matmul(x, weight, Q.Q4_K, y[:, 5:13])
    torch.testing.assert_close(y[:, 5:13], gguf_ops.reference_matmul(x, weight, Q.Q4_K), rtol=1e-5, atol=1e-4)
    assert (y[:, :5] == 7).all() and (y[:, 13:] == 7).all()


def _gguf_layer(shards: list[tuple[GGMLQuantizationType, int]], num_in: int, bias: bool) -> tuple[Linear, list]:
    """A fused Linear on the GGUF method with one shard per (format, rows), loaded as the engine loads."""
    layer = Linear(num_in, sum(rows for _, rows in shards), bias=bias, output_sizes=[rows for _, rows in shards])
    layer.set_method(GgufLinearMethod())
    weights = [random_weight(qtype, rows, num_in, seed=i) for i, (qtype, rows) in enumerate(shards)]
    for shard_id, ((qtype, rows), weight) in enumerate(zip(shards, weights, strict=True)):
        layer.weight.weight_loader(layer.weight, GgufTensor(weight, qtype, (rows, num_in)), shard_id)
        if bias:
            layer.bias.weight_loader(layer.bias, torch.randn(rows), shard_id)
    layer.process_weights_after_loading()
    dense = torch.cat([gguf_ops.dequantize_weight(w, q, num_in) for (q, _), w in zip(shards, weights, strict=True)])
    return layer, dense


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_of_mixed_formats_matches_its_dequantized_weight(bias: bool) -> None:
    # A Q4_K_M-style QKV: Q and K in Q4_K, V in Q6_K -> two runs of one format each.
    layer, dense = _gguf_layer([(Q.Q4_K, 64), (Q.Q4_K, 32), (Q.Q6_K, 32)], 256, bias)
    assert [(run.qtype, run.start, run.weight.shape[0]) for run in layer.weight.segments] == [(Q.Q4_K, 0, 96),
                                                                                           (Q.Q6_K, 96, 32)]
    assert layer.weight.numel() == 96 * 144 + 32 * 210  # the file's bytes, nothing else
    for rows in (1, 7, DEQUANTIZED_GEMM_ROWS):  # the kernels, and one dequantization + BLAS for long chunks
        x = torch.randn(rows, 256)
        expected = (x.double() @ dense.double().t() + (0 if layer.bias is None else layer.bias.double())).float()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_dequantized_gemm_runs_on_panels_across_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    # Panels of 16 rows: the Q4_K run of 40 rows ends mid-panel, so the Q6_K run's panels start at column 40.
    monkeypatch.setattr(gguf_method, "DEQUANTIZED_PANEL_ROWS", 16)
    layer, dense = _gguf_layer([(Q.Q4_K, 40), (Q.Q6_K, 24)], 256, bias=True)
    x = torch.randn(DEQUANTIZED_GEMM_ROWS, 256)
    expected = (x.double() @ dense.double().t() + layer.bias.double()).float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_float_shard_and_shape_and_format_errors() -> None:
    layer = Linear(64, 8)
    layer.set_method(GgufLinearMethod())
    dense = torch.randn(8, 64)
    layer.weight.weight_loader(layer.weight, dense, None)  # an F16/F32 matrix in the file: kept as F32 rows
    layer.process_weights_after_loading()
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ dense.t(), rtol=1e-5, atol=1e-5)

    other = Linear(256, 8)
    other.set_method(GgufLinearMethod())
    with pytest.raises(ValueError, match=r"has shape \(4, 256\), expected \(8, 256\)"):
        other.weight.weight_loader(other.weight, GgufTensor(random_weight(Q.Q8_0, 4, 256), Q.Q8_0, (4, 256)), None)
    q2k = torch.zeros(8, GGML_QUANT_SIZES[Q.Q2_K][1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="is Q2_K, which kvserve cannot compute on .* quantization='none'"):
        other.weight.weight_loader(other.weight, GgufTensor(q2k, Q.Q2_K, (8, 256)), None)


def test_embedding_and_tied_head_share_the_quantized_bytes() -> None:
    embedding = VocabEmbedding(50, 256)
    embedding.set_method(GgufLinearMethod())
    head = Linear(256, 50)
    head.set_method(GgufLinearMethod())
    head.weight = embedding.weight  # tie_weights
    weight = random_weight(Q.Q8_0, 50, 256)
    embedding.weight.weight_loader(embedding.weight, GgufTensor(weight, Q.Q8_0, (50, 256)), None)
    embedding.process_weights_after_loading()
    head.process_weights_after_loading()  # a second call on the shared parameter changes nothing
    assert embedding.weight.shards == {}  # the loaded shards are released: one copy of the bytes stays
    dense = gguf_ops.dequantize_weight(weight, Q.Q8_0, 256)
    ids = torch.tensor([4, 49, 4])
    assert torch.equal(embedding(ids), dense[ids])
    hidden = torch.randn(3, 256)
    torch.testing.assert_close(head(hidden), hidden @ dense.t(), rtol=1e-5, atol=1e-4)
    assert head.weight.data_ptr() == embedding.weight.data_ptr() and head.weight.numel() == weight.numel()
