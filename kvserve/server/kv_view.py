"""Read-only KV-cache endpoints for the web page's live view (and anyone curious): the pool and the requests'
block tables now, and kv-memory's table for the loaded model. Under /v1/, so an API key guards them too."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request

from kvserve.engine.async_engine import EngineDeadError
from kvserve.server.errors import OpenAIError

router = APIRouter()


@router.get("/v1/kv/snapshot")
async def snapshot(request: Request) -> dict[str, Any]:
    """Every block's reference count, the cached blocks, each request's block table, and the engine's stats
    (kv/kv_snapshot.py); taken between two engine steps."""
    server = request.app.state.server
    try:
        picture = await asyncio.wrap_future(server.async_engine.call(lambda engine: engine.kv_snapshot()))
    except EngineDeadError as error:
        raise OpenAIError(503, f"no KV snapshot: {error}", type="server_error", code="engine_dead") from None
    return {**picture, "latency": server.metrics.latency_totals()}


@router.get("/v1/kv/memory")
async def memory(request: Request, context: int = Query(4096, ge=1, le=2**24),
                 batch: int = Query(1, ge=1, le=2**16)) -> dict[str, Any]:
    """`kvserve kv-memory --json` for the loaded model: KV bytes per token of its attention and of its MHA / GQA /
    MQA / MLA equivalents, in every KV dtype, and the totals for `context` tokens x `batch` sequences."""
    return request.app.state.server.async_engine.engine.kv_memory(context, batch)
