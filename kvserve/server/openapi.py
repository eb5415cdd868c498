"""The OpenAPI document as the server behaves: its real status codes, error bodies and media types.

FastAPI documents a 422 that this server never sends (validation errors are OpenAI-shaped 400s) and none of
the errors it does send; the routes declare their own 200s, and this fills in the errors by rule, so that a
route added later is described the same way.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kvserve.server.auth import is_api_path
from kvserve.server.protocol import ErrorResponse

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_ERRORS = {
    "400": "Invalid request: the message and `param` name the field",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "Unknown model",
    "413": "Request body larger than --max-request-body-bytes",
    "500": "Failure inside the server or the engine (never client input)",
    "503": "Overloaded (too many sequences waiting), shutting down, or the engine loop is not running",
}
# Models that only the documents below refer to; added to the components when the document is built.
_EXTRA_MODELS: list[type[BaseModel]] = [ErrorResponse]


def sse(chunk: type[BaseModel]) -> dict[str, Any]:
    """The `text/event-stream` content of a stream of `chunk` events, an error event maybe, then `[DONE]`.

    Before OpenAPI 3.2, `schema` describes each event; its `data` is JSON (contentMediaType/contentSchema).
    """
    if chunk not in _EXTRA_MODELS:
        _EXTRA_MODELS.append(chunk)
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk.__name__}"}, _ERROR_REF]}}
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}
    return {"text/event-stream": {"schema": event}}


def _error_codes(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    """The errors an operation can answer, by rule."""
    codes = []
    has_body = "requestBody" in operation
    if has_body:
        codes += ["400", "413"]
    elif any(parameter.get("in") == "query" for parameter in operation.get("parameters", [])):
        codes.append("400")  # a query parameter out of its range
    if is_api_path(path):
        codes.append("401")
    if has_body and is_api_path(path):
        codes.append("404")  # a model name
    if has_body and path.startswith("/v1"):
        codes += ["500", "503"]  # generation: the engine, admission
    if path == "/v1/kv/snapshot":
        codes.append("503")  # taken on the engine loop, which may be gone
    return codes


def _describe(schema: dict[str, Any]) -> None:
    schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    components = schema["components"]["schemas"]
    for model in _EXTRA_MODELS:
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, nested in definition.pop("$defs", {}).items():
            components.setdefault(name, nested)
        components.setdefault(model.__name__, definition)
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for code in _error_codes(path, method, operation):
                responses.setdefault(code, {"description": _ERRORS[code],
                                            "content": {"application/json": {"schema": _ERROR_REF}}})


def install_openapi(app: FastAPI) -> None:
    """Replace the app's openapi() with one that documents what the server really answers."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _describe(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
