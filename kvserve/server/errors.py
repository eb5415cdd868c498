"""OpenAI-shaped errors: one exception type, and the handlers that turn every failure into one."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvserve.inputs import ContextLengthExceededError
from kvserve.server.protocol import ErrorInfo, ErrorResponse, FieldError

logger = logging.getLogger(__name__)

# A ValueError from SamplingParams or the engine starts with the field it is about.
_LEADING_FIELD = re.compile(r"^([a-z_]+) ")
# Union members pydantic names in an error location ("str", "list[int]"): not fields.
_UNION_TAGS = {"str", "int", "float", "bool", "none"}


class OpenAIError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON response of this error."""
        body = ErrorResponse(error=self.info).model_dump()
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


def invalid_request(error: ValueError, renames: dict[str, str] | None = None) -> OpenAIError:
    """A 400 from a ValueError whose message starts with the field name (SamplingParams, InputProcessor)."""
    message = str(error)
    match = _LEADING_FIELD.match(message)
    param = match.group(1) if match else None
    if param is not None and renames and param in renames:
        message = renames[param] + message[len(param):]
        param = renames[param]
    code = "context_length_exceeded" if isinstance(error, ContextLengthExceededError) else None
    return OpenAIError(400, message, param=param, code=code)


def overloaded(retry_after_s: int) -> OpenAIError:
    """A 503 for when the waiting queue is full."""
    return OpenAIError(503, "the server is overloaded: too many requests are waiting; retry later",
                       type="server_error", code="overloaded", headers={"Retry-After": str(retry_after_s)})


def internal_error(message: str) -> OpenAIError:
    """A 500 for a failure inside the server or the engine (never for client input)."""
    return OpenAIError(500, message, type="server_error", code="internal_error")


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return validation_error(error.errors()).response()


def validation_error(problems: Sequence[dict[str, Any]]) -> OpenAIError:
    """A 400 naming the field of pydantic's (or FastAPI's) most specific validation problem."""
    # Report the most specific problem: in a union, the deepest location is the member that almost fit.
    problem = max(problems, key=lambda e: len(e.get("loc", ())))
    location = [p for p in problem.get("loc", ()) if p != "body"]
    # The message names the exact spot; `param` stops at the field whose type is a union.
    tag = next((i for i, p in enumerate(location) if _is_union_tag(p)), len(location))
    param = _path(location[:tag])
    where = _path([p for p in location if not _is_union_tag(p)])
    field_error = problem.get("ctx", {}).get("error")
    if isinstance(field_error, FieldError):  # raised by a model about one of its fields: name that field
        param = ".".join(p for p in (where, field_error.param) if p).replace(".[", "[")
        message = str(field_error).removeprefix(field_error.param)
        return OpenAIError(400, param + message, param=param)
    if problem.get("type") == "string_unicode":  # pydantic's own lone-surrogate check (constrained strings)
        return OpenAIError(400, f"{where} is not valid Unicode: it holds a lone surrogate code point",
                           param=param)
    if problem.get("type") == "json_invalid":
        message, param = f"the body is not valid JSON: {problem.get('msg')}", None
    elif where is None:
        message = f"the body is invalid: {problem.get('msg')}"
    else:
        message = f"{where}: {problem.get('msg')}"
    return OpenAIError(400, message, param=param)


def _path(parts: list[str | int]) -> str | None:
    """messages[0].content from ('messages', 0, 'content')."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or None


def _is_union_tag(part: object) -> bool:
    # "list[int]", "function-after[...]", "constrained-str": pydantic's names of union members, never field names.
    return isinstance(part, str) and ("[" in part or "-" in part or part in _UNION_TAGS)


def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = str(error.detail)
    if error.status_code in (404, 405):  # Starlette's bare "Not Found" does not say what was asked
        message = f"{message}: {request.method} {request.url.path}"
    return OpenAIError(error.status_code, message, type=kind, headers=error.headers).response()


def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # Called by the app's error middleware, outside the `except` block: pass the error for its traceback
    # (logger.exception here would log "NoneType: None").
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=error)
    return internal_error(f"internal error: {type(error).__name__}").response()


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, including FastAPI's own (bad JSON, 404, 405), OpenAI-shaped."""
    app.add_exception_handler(OpenAIError, lambda request, error: error.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
