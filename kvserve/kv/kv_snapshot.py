"""A read-only picture of the KV cache for the web page's live view: each block's references, the cached blocks,
and every request's block table.

Built on the engine thread between steps (`AsyncEngine.call`) and only when asked: while no page watches, the
engine loop does nothing for it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from kvserve.engine.request import Request
from kvserve.kv.sinks_window import EVICTED

if TYPE_CHECKING:
    from kvserve.engine.engine import Engine


def kv_snapshot(engine: Engine) -> dict[str, Any]:
    """The pool (ref_counts by block id, cached block ids), the requests' tables and the engine's stats.

    A block is free (0 references), shared (2+: a prefix several requests reuse) or cached (its K/V named in the
    prefix cache, reusable even once free). A table entry of -1 is a block a sliding window gave back; with int4,
    a running request's last, incomplete block is still in its full-precision residual slot (`residual`).
    """
    manager = engine.kv_manager
    cache = engine.config.cache
    scheduler = engine.scheduler
    requests = [_request(manager, request, "running", cache.kv_cache_dtype == "int4") for request in scheduler.running]
    requests += [_request(manager, request, "waiting", False) for request in scheduler.waiting]
    return {
        "time": time.time(),
        "num_blocks": manager.num_blocks,
        "block_size": manager.block_size,
        "kv_cache_dtype": engine.config.cache.storage_dtype(engine.config.load.dtype),
        "num_kv_groups": manager.num_groups,
        "kv_window": None if manager.window is None else {"window": cache.kv_window, "sinks": cache.kv_sinks},
        "ref_counts": manager.pool.ref_counts(),
        "cached_blocks": sorted(manager.pool.prefix_cache.cached_blocks()),
        "requests": requests,
        "stats": dataclasses.asdict(engine.stats()),
    }


def _request(manager: Any, request: Request, status: str, int4: bool) -> dict[str, Any]:
    table = manager.block_table(request.request_id)
    block_size = manager.block_size
    # int4 quantizes a block when it fills: the newest block of a running request is exact until then.
    residual = int4 and table and request.num_computed_tokens % block_size
    return {
        "id": request.request_id,
        "status": status,
        "num_prompt_tokens": request.num_prompt_tokens,
        "num_output_tokens": len(request.output_token_ids),
        "num_computed_tokens": request.num_computed_tokens,
        "num_cached_tokens": request.num_cached_tokens,
        "num_preemptions": request.num_preemptions,
        "block_table": [-1 if block == EVICTED else block for block in table],
        "residual_block": table[-1] if residual else None,
    }
