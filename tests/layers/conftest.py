"""What the kernel tests share: each runs on one thread and on two (the threads split the output rows)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}threads")
def num_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's (and so the compiled kernels' OpenMP) thread count for the test, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)
