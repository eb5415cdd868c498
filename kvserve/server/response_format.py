"""The wire format of structured output: OpenAI's `response_format` (chat) and vLLM's `structured_outputs` extra."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvserve.structured.params import StructuredOutputsParams


class _Strict(BaseModel):
    # Unknown keys are refused, not ignored: a constraint the server silently dropped would return unconstrained
    # text with a 200.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: a named JSON schema; the output always matches it (strict or not)."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """`response_format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def params(self) -> StructuredOutputsParams | None:
        """The constraint it asks for; None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None:
            raise ValueError("response_format json_schema is required when type is json_schema")
        return StructuredOutputsParams(json=self.json_schema.schema_)


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` extra (set exactly one of json, regex, choice, grammar, json_object)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, max_length=1024)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = True

    def params(self) -> StructuredOutputsParams:
        """StructuredOutputsParams; raises ValueError starting with "structured_outputs"."""
        return StructuredOutputsParams(json=self.json_, regex=self.regex, choice=self.choice, grammar=self.grammar,
                                       json_object=self.json_object,
                                       disable_any_whitespace=self.disable_any_whitespace)


def structured_outputs_of(extra: StructuredOutputsRequest | None,
                          response_format: ResponseFormat | None = None) -> StructuredOutputsParams | None:
    """The one constraint of a request, from either field; ValueError naming the field when both set one."""
    from_format = response_format.params() if response_format is not None else None
    if extra is None:
        return from_format
    if from_format is not None:
        raise ValueError("response_format and structured_outputs cannot both constrain the output; use one")
    return extra.params()
