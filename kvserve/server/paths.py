"""Path normalization: `/v1/completions/` is served as `/v1/completions`, never redirected.

A 307 to the slash-less path makes clients re-send the body (some drop it, or the Authorization header on the
way); OpenAI's own clients build paths either way, so both spellings are the same route.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class StripTrailingSlashMiddleware:
    """Removes trailing slashes from the request path (except the root) before routing and auth see it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and len(path) > 1 and path.endswith("/"):
            stripped = path.rstrip("/") or "/"
            scope = {**scope, "path": stripped, "raw_path": stripped.encode()}
        await self.app(scope, receive, send)
