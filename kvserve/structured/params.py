"""StructuredOutputsParams: what a request's output must match (vLLM's names); pure Python, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")
MAX_CHOICES = 1024  # each choice is one alternative of a grammar compiled per distinct request


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint on the generated text: a JSON schema, a regex, a choice, a grammar or any JSON object.

    `json`: a JSON schema (dict, or its JSON text). `regex`: the whole output must match it. `choice`: the output is
    one of these strings. `grammar`: a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's).
    `json_object`: any JSON object. `disable_any_whitespace`: JSON without whitespace between tokens (`{"a":1}`);
    kvserve defaults it to True (vLLM defaults to False) because a small sampled model otherwise fills its budget
    with newlines; pass False for flexible whitespace.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        chosen = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            found = ", ".join(chosen) if chosen else "none"
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_CONSTRAINTS)}; got {found}")
        if self.choice is not None:
            object.__setattr__(self, "choice", list(self.choice))  # a caller's list must not change under us
        self._validate(chosen[0])

    def _validate(self, kind: str) -> None:
        """Raise ValueError naming the field when the constraint's value has the wrong shape."""
        value = getattr(self, kind)
        if isinstance(value, str | list) and not _is_utf8(value):
            # A lone surrogate (JSON "\ud800") cannot reach the grammar compiler, which reads UTF-8.
            raise ValueError(f"structured_outputs {kind} must be valid Unicode (it holds a lone surrogate)")
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as error:
                    raise ValueError(f"structured_outputs json is not valid JSON: {error}") from None
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs json must be a JSON schema object, "
                                 f"got {type(schema).__name__}")
        elif kind == "choice":
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs choice must be a list of non-empty strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs choice must hold at most {MAX_CHOICES} strings, "
                                 f"got {len(self.choice)}")
        elif kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if not isinstance(value, str) or not value:
                raise ValueError(f"structured_outputs {kind} must be a non-empty string")
        elif self.json_object is not True:
            raise ValueError("structured_outputs json_object must be true when set")

    @property
    def kind(self) -> str:
        """Which constraint is set: json, regex, choice, grammar or json_object."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    @property
    def cache_key(self) -> str:
        """A string that two params with the same constraint share (the compiled-grammar cache's key)."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            value = json.loads(value)  # the same schema, however it was spelled
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        return f"{self.kind}:{int(self.disable_any_whitespace)}:{text}"


def _is_utf8(value: str | list[str]) -> bool:
    texts = [value] if isinstance(value, str) else value
    try:
        for text in texts:
            if isinstance(text, str):
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
