"""Keep freed memory in glibc's heap, so that large per-step tensors do not page-fault every step.

By default glibc serves each allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with
a fresh mmap and unmaps it when freed. A CPU step allocates tens of MB of temporaries per layer (the
gathered K/V of a batch of decodes, prefill activations), so every layer touched newly zeroed pages:
on the 2-core CPU a 64-request decode step took 625 ms, 375 ms with the limits below (`/tmp` profile,
see BENCHMARKS.md). The cost: the process keeps its peak heap instead of returning it to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 1 << 30  # only allocations above 1 GiB get their own mapping
_TRIM_THRESHOLD = 2**31 - 1  # (mallopt takes a C int) keep the heap's free top
_TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps


def keep_freed_memory() -> bool:
    """Tune glibc malloc for a long-running engine; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # musl and others have no mallopt
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
