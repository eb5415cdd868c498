"""Size limits checked before the expensive work: the request body's bytes, and a prompt's characters."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.inputs import ContextLengthExceededError
from kvserve.server.errors import OpenAIError


def body_too_large(limit: int) -> str:
    """The 413 message."""
    return f"the request body is larger than {limit} bytes (--max-request-body-bytes)"


class BodySizeLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else as soon as the streamed bytes pass it.

    Plain ASGI, so that responses (streams) pass through untouched. A body that overflows while the route reads
    it raises an HTTPException(413), which FastAPI's body reading lets through to the OpenAI-shaped handlers.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = OpenAIError(413, body_too_large(self.max_bytes), code="request_too_large")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        num_bytes = 0

        async def counted() -> Message:
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_bytes:
                    raise HTTPException(413, body_too_large(self.max_bytes))
            return message

        return counted


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters one token can stand for (its vocabulary's longest entry), or None when no bound holds.

    A byte-level token's string has one character per byte, a SentencePiece piece one per character, so the
    longest entry bounds the text a token covers. A normalizer or a whitespace-dropping pre-tokenizer may remove
    characters before the split: then no bound is safe, and None turns the cheap check off.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    splitter = str(backend.pre_tokenizer)
    if "Whitespace" in splitter or "emoved" in splitter:  # WhitespaceSplit, Split(behavior="removed")
        return None
    vocab = tokenizer.get_vocab()
    return max(map(len, vocab)) if vocab else None


class PromptLengthGuard:
    """Rejects text that cannot fit in the context window by its length alone, before tokenizing it."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.chars_per_token = max_chars_per_token(tokenizer)

    @property
    def max_chars(self) -> int | None:
        """Characters past which a text surely has max_model_len tokens or more (None: no bound known)."""
        return None if self.chars_per_token is None else self.max_model_len * self.chars_per_token

    def check(self, num_chars: int, field: str) -> None:
        """Raise ContextLengthExceededError (naming `field`) if `num_chars` characters cannot fit."""
        limit = self.max_chars
        if limit is not None and num_chars > limit:
            raise ContextLengthExceededError(
                f"{field} has {num_chars} characters: at most {self.chars_per_token} characters per token, that is "
                f"more than the {self.max_model_len} tokens of max_model_len (prompt plus one generated token)")
