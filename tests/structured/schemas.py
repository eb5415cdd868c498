"""JSON schemas for the structured-output tests: every kind of constraint a client sends, each bounded so that a
sampled 135M model finishes well inside its token budget."""

from __future__ import annotations

from typing import Any

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": PERSON,
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2,
              "maxItems": 4},
    "nested": {
        "type": "object",
        "properties": {"user": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
            "required": ["id", "tags"],
            "additionalProperties": False,
        }},
        "required": ["user"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "string", "maxLength": 5},
                       "c": {"const": "fixed"}},
        "required": ["a", "c"],
        "additionalProperties": False,
    },
    "top_level_enum": {"enum": ["yes", "no", "maybe"]},
    "any_of": {
        "anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                  {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"],
                   "additionalProperties": False}],
    },
}
