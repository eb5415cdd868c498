"""STAND-IN for the structured-output branch's StructuredOutputsParams (vLLM's field names); not functional here.

Only here so that tool calling can name its constraint; the integrator takes the structured-output branch's file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output: a JSON schema, a regex, a choice, a grammar or any JSON object."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
