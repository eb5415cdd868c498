"""The Triton int8 / int4 weight-only kernels (layers/triton_int.py) against int_ops' float64 references.

Without a GPU they run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before triton is
imported, as in tests/attention/test_triton_attention.py); on a CUDA machine the same checks run compiled.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the interpreter's tl.dot is a numpy matmul on small tiles
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from kvserve.config import EngineConfig  # noqa: E402
from kvserve.layers import int_ops, triton_int  # noqa: E402
from kvserve.layers.linear import Linear  # noqa: E402
from kvserve.layers.quantization.rtn import quantize_int4_groups, quantize_int8_rows  # noqa: E402
from kvserve.platforms.cuda import CudaPlatform  # noqa: E402

if triton_int.IS_INTERPRETED:
    DEVICE = "cpu"  # interpreted
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("triton_int was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

# (rows, in, out): a decode row, a few rows, more rows than one tile of 16 / 64, outputs off the 64-wide tiles
SHAPES = [(1, 128, 64), (5, 96, 40), (17, 256, 130), (70, 64, 8)]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 accumulation of an exact product (ieee tl.dot); a wrong code, scale or group is off by O(1)
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize(("rows", "num_in", "num_out"), SHAPES)
def test_int8_matmul_matches_the_reference(rows: int, num_in: int, num_out: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, num_in, generator=gen)
    q, scale = quantize_int8_rows(torch.randn(num_out, num_in, generator=gen))
    out = torch.empty(rows, num_out, device=DEVICE)
    triton_int.int8_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), out)
    _close(out, int_ops.reference_int8_matmul(x, q, scale))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize(("rows", "num_in", "num_out"), [s for s in SHAPES if s[1] % 128 == 0] + [(3, 384, 24)])
def test_int4_matmul_matches_the_reference(rows: int, num_in: int, num_out: int, group_size: int) -> None:
    gen = torch.Generator().manual_seed(group_size + rows)
    x = torch.randn(rows, num_in, generator=gen)
    groups = quantize_int4_groups(torch.randn(num_out, num_in, generator=gen), group_size)
    packed, minimum = int_ops.pack_nibbles(groups.q), groups.minimum()
    out = torch.empty(rows, num_out, device=DEVICE)
    triton_int.int4_matmul(x.to(DEVICE), packed.to(DEVICE), groups.scale.to(DEVICE), minimum.to(DEVICE), out)
    _close(out, int_ops.reference_int4_matmul(x, packed, groups.scale, minimum))


def test_output_with_a_row_stride_is_written_in_place() -> None:
    """A fused layer's shards write column slices of one output: only their own columns change."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=gen)
    q, scale = quantize_int8_rows(torch.randn(10, 64, generator=gen))
    out = torch.full((3, 24), 7.0, device=DEVICE)
    triton_int.int8_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), out[:, 4:14])
    _close(out[:, 4:14], int_ops.reference_int8_matmul(x, q, scale))
    assert (out[:, :4] == 7).all() and (out[:, 14:] == 7).all()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_cuda_platform_puts_weight_only_layers_on_triton(quantization: str) -> None:
    platform = CudaPlatform(EngineConfig.from_kwargs(quantization=quantization, quantization_group_size=32))
    method = platform.linear_method(torch.bfloat16, quantization)
    assert method.kernels is triton_int
    layer = Linear(64, 48, bias=True)
    layer.set_method(method)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 64, generator=gen)
    layer.weight.weight_loader(layer.weight, weight, None)
    layer.bias.weight_loader(layer.bias, torch.randn(48, generator=gen), None)
    layer.process_weights_after_loading()
    x = torch.randn(4, 64, generator=gen)
    expected = torch.nn.functional.linear(x.double(), method.dequantize(layer).double(), layer.bias.double())
    _close(layer.to(DEVICE)(x.to(DEVICE)), expected.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations_dequantize_in_their_dtype(dtype: torch.dtype) -> None:
    """A bfloat16 / float16 model: the tile is dequantized to the activations' dtype, accumulated in float32."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton 3.6's interpreter gets bfloat16 tl.dot wrong (a plain 16x16 product is off by 1e10)")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 128, generator=gen).to(dtype)
    groups = quantize_int4_groups(torch.randn(70, 128, generator=gen), 32)
    packed, minimum = int_ops.pack_nibbles(groups.q), groups.minimum()
    out = torch.empty(5, 70, dtype=dtype, device=DEVICE)
    triton_int.int4_matmul(x.to(DEVICE), packed.to(DEVICE), groups.scale.to(DEVICE), minimum.to(DEVICE), out)
    dense = int_ops.dequantize_int4(packed, groups.scale, minimum).to(dtype)  # what F.linear would multiply
    expected = x.double() @ dense.double().t()
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
