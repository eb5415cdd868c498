"""Every C kernel in kvserve/native builds wherever a compiler exists. Each kernel's own tests skip when it cannot
be built (no compiler), so a source that stops compiling must fail here rather than skip there."""

from __future__ import annotations

import os
import shutil

import pytest

from kvserve import native


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
@pytest.mark.parametrize("name", sorted(native.SIGNATURES))
def test_every_kernel_builds(name: str, caplog) -> None:
    native.load.cache_clear()  # build (or find) it now, so that the reason of a failure is logged here
    with caplog.at_level("WARNING", logger=native.__name__):
        assert native.load(name) is not None, f"{name}.c does not build:\n{caplog.text}"
