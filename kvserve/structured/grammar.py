"""StructuredOutputsParams -> an llguidance grammar, checked against the tokenizer (errors name the field)."""

from __future__ import annotations

from typing import Any

import llguidance

from kvserve.structured.params import StructuredOutputsParams

# "Any JSON object", the grammar of OpenAI's response_format {"type": "json_object"}.
_ANY_OBJECT = {"type": "object"}


def _json_options(params: StructuredOutputsParams) -> dict[str, Any]:
    # oneOf is read as anyOf (as vLLM does): llguidance refuses oneOf otherwise, and generated schemas (pydantic's
    # unions) use it where the branches rarely overlap. A schema's own "x-guidance" key overrides these defaults.
    options: dict[str, Any] = {"coerce_one_of": True}
    # Compact JSON (`{"a":1,"b":[2]}`) unless the client asked for flexible whitespace: without this a sampled
    # small model spends its budget on runs of newlines and spaces that the grammar allows.
    if params.disable_any_whitespace:
        return {**options, "whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return {**options, "whitespace_flexible": True}


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar definition (its JSON serialization) of the params' one constraint."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = params.json if kind == "json" else _ANY_OBJECT
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(params))
        except ValueError as error:
            raise ValueError(f"structured_outputs {kind} is not a valid JSON schema: {error}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        # llguidance's own "choice" format: one Lark alternative per string, JSON-quoted (escapes included).
        return llguidance.grammar_from("choice", params.choice)
    try:  # Lark, or GBNF converted to Lark
        return llguidance.grammar_from("grammar", params.grammar)
    except ValueError as error:
        raise ValueError(f"structured_outputs grammar is not a valid Lark or GBNF grammar: {error}") from None


def compile_matcher(params: StructuredOutputsParams, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
    """A fresh matcher for the params; ValueError naming the field when the schema, regex or grammar is invalid."""
    matcher = llguidance.LLMatcher(tokenizer, grammar_text(params), log_level=0)
    if matcher.is_error():
        raise ValueError(f"structured_outputs {params.kind} is invalid: {_first_line(matcher.get_error())}")
    return matcher


def _first_line(message: str, limit: int = 500) -> str:
    # llguidance errors can carry a caret diagram of the grammar; the first lines say what is wrong.
    return " ".join(message.strip().splitlines()[:3])[:limit]
