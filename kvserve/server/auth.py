"""API-key check for /v1/* routes, as plain ASGI middleware so that streams pass through untouched."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from kvserve.server.errors import OpenAIError


class ApiKeyMiddleware:
    """Answers 401 to /v1/* requests without `Authorization: Bearer <key>`; /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api_path(scope["path"]) and not self._authorized(scope):
            error = OpenAIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest takes as long for a near miss as for a far one: no timing oracle on the key.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)


def _is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")
