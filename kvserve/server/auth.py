"""API-key check for /v1/* routes (HTTP and WebSocket), /tokenize and /detokenize, as plain ASGI middleware."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from kvserve.server.errors import OpenAIError


class ApiKeyMiddleware:
    """Answers 401 to /v1/* requests without `Authorization: Bearer <key>`; /health and /metrics stay open.

    A WebSocket upgrade may carry the key as `?api_key=<key>` instead, since browsers cannot set its headers.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_api_path(scope["path"]) and not self._authorized(scope):
            error = OpenAIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        if scope["type"] == "websocket" and is_api_path(scope["path"]) and not (
                self._authorized(scope) or self._authorized_by_query(scope)):
            await _deny_socket(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest takes as long for a near miss as for a far one: no timing oracle on the key.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    def _authorized_by_query(self, scope: Scope) -> bool:
        keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [])
        return len(keys) == 1 and hmac.compare_digest(keys[0].encode(), self._key)


async def _deny_socket(scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse an upgrade: the 401 body where the server can send one, else a close (HTTP 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        error = OpenAIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>' or ?api_key=<key>",
                            code="invalid_api_key")
        await error.response()(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008})


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
