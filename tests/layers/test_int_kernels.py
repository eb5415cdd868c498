"""The int8 / int4 kernels (native/int_matmul.c) against the float64 matmul of the same dequantized weights:
odd output sizes, group sizes 32 / 64 / 128, one to many rows, one and two threads; the nibble and AWQ packings;
round-to-nearest quantization."""

from __future__ import annotations

import pytest
import torch

from kvserve.layers import int_ops
from kvserve.layers.quantization.awq_format import from_awq, pack_awq, to_awq, unpack_awq
from kvserve.layers.quantization.rtn import (
    check_group_size,
    default_group_size,
    quantize_int4_groups,
    quantize_int8_rows,
)

needs_kernels = pytest.mark.skipif(not int_ops.available(), reason="no C compiler: the int kernels cannot build")
SHAPES = [(64, 1), (128, 37), (576, 96), (1536, 5), (384, 130)]  # (in, out): odd out sizes, SmolLM2's inputs
ROWS = [1, 2, 5, 16]


def _assert_close(y: torch.Tensor, expected: torch.Tensor, shape: tuple[int, ...]) -> None:
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                               msg=lambda m: f"{shape}: {m}")


@needs_kernels
def test_int8_matmul_matches_reference(num_threads: int) -> None:
    torch.manual_seed(0)
    for num_in, num_out in [*SHAPES, (37, 9), (15, 3)]:  # and input sizes that leave 8- and 1-value tails
        q, scale = quantize_int8_rows(torch.randn(num_out, num_in))
        for rows in ROWS:
            x = torch.randn(rows, num_in)
            y = torch.empty(rows, num_out)
            int_ops.int8_matmul(x, q, scale, y)
            _assert_close(y, int_ops.reference_int8_matmul(x, q, scale), (rows, num_in, num_out))


@needs_kernels
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matmul_matches_reference(group_size: int, num_threads: int) -> None:
    torch.manual_seed(group_size)
    for num_in, num_out in SHAPES:
        if num_in % group_size:
            continue
        groups = quantize_int4_groups(torch.randn(num_out, num_in), group_size)
        packed, minimum = int_ops.pack_nibbles(groups.q), groups.minimum()
        for rows in ROWS:
            x = torch.randn(rows, num_in)
            y = torch.empty(rows, num_out)
            int_ops.int4_matmul(x, packed, groups.scale, minimum, y)
            expected = int_ops.reference_int4_matmul(x, packed, groups.scale, minimum)
            _assert_close(y, expected, (rows, num_in, num_out, group_size))
            # The reference is the format's own meaning, (q - zero) * scale, not a second copy of the kernel's.
            torch.testing.assert_close(expected, (x.double() @ groups.dequantize().double().t()).float(),
                                       rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_kernels
def test_output_columns_of_a_wider_matrix_are_written_in_place() -> None:
    torch.manual_seed(1)
    weight = torch.randn(8, 128)
    q, scale = quantize_int8_rows(weight)
    groups = quantize_int4_groups(weight, 64)
    x = torch.randn(3, 128)
    for kernel, reference in (
            (lambda out: int_ops.int8_matmul(x, q, scale, out), int_ops.reference_int8_matmul(x, q, scale)),
            (lambda out: int_ops.int4_matmul(x, int_ops.pack_nibbles(groups.q), groups.scale, groups.minimum(), out),
             int_ops.reference_int4_matmul(x, int_ops.pack_nibbles(groups.q), groups.scale, groups.minimum()))):
        y = torch.full((3, 20), 7.0)
        kernel(y[:, 5:13])
        torch.testing.assert_close(y[:, 5:13], reference, rtol=1e-5, atol=1e-4)
        assert (y[:, :5] == 7).all() and (y[:, 13:] == 7).all()


def test_nibbles_pack_value_j_low_and_j_plus_16_high() -> None:
    q = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    packed = int_ops.pack_nibbles(q)
    assert packed.shape == (1, 32)
    assert packed[0, 0].item() == (q[0, 0] | q[0, 16] << 4).item()
    assert packed[0, 17].item() == (q[0, 33] | q[0, 49] << 4).item()  # second chunk, byte 1
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(int_ops.unpack_nibbles(int_ops.pack_nibbles(codes)), codes)


def test_awq_packs_columns_in_its_interleaved_nibble_order() -> None:
    # AutoAWQ puts column order_map[k] (order_map = 0, 2, 4, 6, 1, 3, 5, 7) of each eight in nibble k.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[0x86427531 - 2**32], [0xF]], dtype=torch.int32)
    assert torch.equal(pack_awq(codes), expected)
    assert torch.equal(unpack_awq(expected), codes.to(torch.uint8))
    codes = torch.randint(0, 16, (6, 40), dtype=torch.uint8)
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)


def test_awq_tensors_are_transposed_codes_and_float16_scales() -> None:
    torch.manual_seed(2)
    groups = quantize_int4_groups(torch.randn(16, 128), 64, scale_dtype=torch.float16)
    tensors = to_awq(groups)
    assert tensors["qweight"].shape == (128, 2) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (2, 2) and tensors["scales"].shape == (2, 16)
    assert tensors["scales"].dtype == torch.float16
    back = from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"].float())
    assert torch.equal(back.q, groups.q) and torch.equal(back.zero, groups.zero)
    assert torch.equal(back.scale, groups.scale)  # the scales were float16 values already
    with pytest.raises(ValueError, match="AWQ tensors disagree"):
        from_awq(tensors["qweight"], tensors["qzeros"][:, :1], tensors["scales"])


def test_int8_rows_round_to_nearest_with_the_row_maximum_at_127() -> None:
    weight = torch.tensor([[0.5, -1.27, 0.004, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_int8_rows(weight)
    torch.testing.assert_close(scale, torch.tensor([0.01, 1.0]))
    assert q.tolist() == [[50, -127, 0, 0], [0, 0, 0, 0]]


def test_int4_groups_span_min_to_max_and_zero_with_an_integer_zero_point() -> None:
    weight = torch.cat([torch.linspace(-1.0, 2.0, 32), torch.linspace(0.5, 0.8, 32)]).view(1, 64)
    groups = quantize_int4_groups(weight, 32)
    torch.testing.assert_close(groups.scale, torch.tensor([[0.2, 0.8 / 15]]))
    assert groups.zero.tolist() == [[5, 0]]  # -(-1.0) / 0.2 = 5; a positive group's range starts at 0
    assert groups.q[0, 0] == 0 and groups.q[0, 31] == 15 and groups.q[0, 63] == 15
    error = (groups.dequantize() - weight).abs().view(2, 32).amax(dim=1)
    assert (error <= groups.scale[0] / 2 + 1e-6).all()  # round to nearest: within half a step


def test_group_sizes_are_checked_and_defaulted() -> None:
    assert [default_group_size(n) for n in (576, 1536, 96, 64)] == [64, 128, 32, 64]
    with pytest.raises(ValueError, match="multiple of 32"):
        default_group_size(100)
    with pytest.raises(ValueError, match="group size 128 does not fit input size 576"):
        check_group_size(576, 128)
