"""The web page at `/`: a chat with streaming and a live view of the KV cache (kvserve/server/static: plain ES
modules and CSS, no build step, nothing fetched from a CDN). The page itself needs no API key; it asks for one
when the /v1 API answers 401."""

from __future__ import annotations

import pathlib

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = pathlib.Path(__file__).parent / "static"


def install_playground(app: FastAPI) -> None:
    """Serve index.html at `/` and the rest of the page under /static/."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")
