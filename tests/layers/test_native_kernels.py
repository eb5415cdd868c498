"""The compiled GEMV and RMSNorm against torch; a deliberately broken GEMV fails the same check."""

from __future__ import annotations

import ctypes
import pathlib

import pytest
import torch

from kvserve import native
from kvserve.layers import native_ops

pytestmark = pytest.mark.skipif(not native_ops.available(), reason="no C compiler: the kernels could not be built")

# (in, out): multiples of the kernel's 32-float stride and not (the scalar tail), SmolLM2's, one output row.
GEMV_SHAPES = [(64, 96), (7, 5), (33, 130), (1536, 576), (576, 3072), (100, 1)]


def _check_gemv(gemv_f32: ctypes._CFuncPtr) -> None:
    """gemv_f32(x, w [out, in], y, in, out) computes w @ x for every shape, on 1 and 2 threads."""
    previous = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            for num_in, num_out in GEMV_SHAPES:
                x, weight = torch.randn(1, num_in), torch.randn(num_out, num_in)
                y = torch.full((1, num_out), float("nan"))
                gemv_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), num_in, num_out)
                torch.testing.assert_close(y, x @ weight.t(), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(previous)


def test_gemv_matches_torch_within_rounding() -> None:
    _check_gemv(native.load("gemv").gemv_f32)
    x, weight = torch.randn(1, 33), torch.randn(130, 33)
    torch.testing.assert_close(native_ops.gemv(x, weight), x @ weight.t(), atol=1e-4, rtol=1e-5)


def test_the_check_catches_a_gemv_that_drops_the_tail(tmp_path: pathlib.Path) -> None:
    """The same check fails for a kernel that skips the inputs past the last full 32-float stride."""
    source = (native.SOURCE_DIR / "gemv.c").read_text()
    tail = "for (; i < in; i++) sum += x[i] * row[i];"
    assert tail in source
    broken = tmp_path / "gemv_broken.c"
    broken.write_text(source.replace(tail, ""))
    library = tmp_path / "gemv_broken.so"
    native._compile(native.shutil.which("cc"), broken, library)
    kernel = ctypes.CDLL(str(library))
    kernel.gemv_f32.restype, kernel.gemv_f32.argtypes = native.SIGNATURES["gemv"]["gemv_f32"]
    with pytest.raises(AssertionError):
        _check_gemv(kernel.gemv_f32)


def test_rms_norm_matches_torch_within_rounding() -> None:
    weight = torch.randn(576)
    for rows in (0, 1, 7, 300):  # 300 x 576 rows run on several threads
        x = torch.randn(rows, 576) * 3
        expected = torch.nn.functional.rms_norm(x, (576,), weight, 1e-5)
        torch.testing.assert_close(native_ops.rms_norm(x, weight, 1e-5), expected, atol=1e-5, rtol=1e-5)
