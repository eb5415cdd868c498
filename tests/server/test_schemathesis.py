"""A bounded Schemathesis run: /openapi.json describes what the server answers, for valid and invalid input.

In process over the ASGI app on the fake engine (strict: a fake tokenizer, the real length rules), so it needs
no model. Per operation: the schema's examples, Schemathesis' coverage cases (edges, wrong methods) and up to
100 generated ones, valid and invalid; several hundred requests in all, deterministic, about 20 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serve_harness import FakeEngine

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# Built at import (schemathesis parametrizes at collection); the engine loop runs only during the tests.
_METRICS = ServerMetrics()
_ENGINE = AsyncEngine(FakeEngine(step_s=0.0005, strict=True), _METRICS)  # type: ignore[arg-type]
API_SCHEMA = schemathesis.openapi.from_asgi("/openapi.json",
                                            build_app(_ENGINE, _METRICS, ServerConfig(served_model_name="fake")))
API_SCHEMA.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True)


@pytest.fixture(scope="module", autouse=True)
def _engine_loop() -> Iterator[None]:
    _ENGINE.start()
    yield
    _ENGINE.shutdown()


@API_SCHEMA.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_conformance(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)


def test_openapi_documents_the_real_answers() -> None:
    document = API_SCHEMA.raw_schema
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert "422" not in operation["responses"], (method, path)
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "500", "503"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    fields = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert fields["n"]["minimum"] == 1 and fields["n"]["maximum"] == 16
    assert fields["temperature"]["minimum"] == 0
    assert fields["top_p"]["exclusiveMinimum"] == 0 and fields["top_p"]["maximum"] == 1
    assert (fields["presence_penalty"]["minimum"], fields["presence_penalty"]["maximum"]) == (-2, 2)
