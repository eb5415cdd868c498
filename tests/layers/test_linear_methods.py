"""Every linear method, and every fast path of the CPU one, computes F.linear within rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvserve.layers import native_ops, onednn
from kvserve.layers.host_blas import HostBlasStep
from kvserve.layers.linear import Linear
from kvserve.layers.quantization import UnquantizedLinearMethod
from kvserve.layers.quantization.cpu import CpuLinearMethod

SHAPES = [(64, 96), (7, 5), (576, 960), (1536, 576), (33, 130)]  # (in, out): SmolLM2's and odd sizes
ROWS = [1, 2, 16, 64]


def _layer(num_in: int, num_out: int, bias: bool) -> Linear:
    """A Linear with random weights (and bias)."""
    layer = Linear(num_in, num_out, bias=bias)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


def _methods() -> dict[str, CpuLinearMethod | UnquantizedLinearMethod]:
    """The plain method and each CPU variant that this machine can run (a step on OpenBLAS is entered below)."""
    methods = {"unquantized": UnquantizedLinearMethod(),
               "cpu plain": CpuLinearMethod(False, False, HostBlasStep(0))}
    if native_ops.available():
        methods["cpu gemv"] = CpuLinearMethod(True, False, HostBlasStep(0))
    if onednn.available():
        methods["cpu packed"] = CpuLinearMethod(False, True, HostBlasStep(0))
    if native_ops.available() and onednn.available():
        methods["cpu gemv + packed"] = CpuLinearMethod(True, True, HostBlasStep(0))
    return methods


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", list(_methods()))
def test_method_matches_f_linear(name: str, bias: bool, num_threads: int) -> None:
    torch.manual_seed(0)
    for num_in, num_out in SHAPES:
        layer = _layer(num_in, num_out, bias)
        layer.set_method(_methods()[name])
        layer.process_weights_after_loading()
        for rows in ROWS:
            x = torch.randn(rows, num_in)
            expected = F.linear(x.double(), layer.weight.double(), None if bias is False else layer.bias.double())
            # float32 rounding of a dot product scales with its terms |x_i w_i|, not with the (cancelling) sum
            terms = (x.abs() @ layer.weight.abs().t()).max().item()
            torch.testing.assert_close(layer(x), expected.float(), atol=1e-5 * terms, rtol=1e-5,
                                       msg=lambda m, s=(rows, num_in, num_out): f"{s}: {m}")


@pytest.mark.parametrize("bias", [False, True])
def test_host_blas_step_matches_f_linear_and_restores_threads(bias: bool) -> None:
    step = HostBlasStep(max_tokens=64)
    method = CpuLinearMethod(False, False, step)
    previous = torch.get_num_threads()
    for num_in, num_out in SHAPES:
        layer = _layer(num_in, num_out, bias)
        layer.set_method(method)
        for rows in ROWS:
            x = torch.randn(rows, num_in)
            with step.run():
                assert step.active and torch.get_num_threads() == 1
                y = layer(x)
            torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)
    assert not step.active and torch.get_num_threads() == previous


def test_packed_copy_is_counted_and_the_plain_weight_kept() -> None:
    if not onednn.available():
        pytest.skip("this torch build has no oneDNN packed linear")
    layer = _layer(64, 96, bias=False)
    layer.set_method(CpuLinearMethod(False, True, HostBlasStep(0)))
    layer.process_weights_after_loading()
    assert layer.method.derived_bytes(layer) >= 64 * 96 * 4
    assert layer.weight.shape == (96, 64)  # checkpoint layout, still there for one-row steps
    assert UnquantizedLinearMethod().derived_bytes(layer) == 0


def test_fused_output_sizes_must_add_up() -> None:
    with pytest.raises(ValueError, match=r"output_sizes \[4, 4\] do not add up to out_features=10"):
        Linear(8, 10, output_sizes=[4, 4])
