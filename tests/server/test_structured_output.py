"""Structured output over HTTP: `response_format` through the official `openai` client, vLLM's `structured_outputs`
extra on both endpoints, streaming, and 400s naming the field for every malformed or invalid constraint."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from serve_harness import MODEL, assert_openai_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16},
                   "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
                   "coastal": {"type": "boolean"}},
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}


def post(url: str, path: str, body: object) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800 (httpx's own encoder would refuse it).
    return httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=120)


def test_openai_client_response_format_json_schema(live) -> None:
    response = live.client().chat.completions.create(model=MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT,
                                                     temperature=1.0, seed=11, n=2, max_tokens=96)
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), CITY)


def test_openai_client_json_object_and_text(live) -> None:
    client = live.client()
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=64,
                                              response_format={"type": "json_object"})
    choice = response.choices[0]
    if choice.finish_reason == "stop":  # any object may go on for long; a finished one must parse
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8,
                                           response_format={"type": "text"})
    unset = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8)
    assert plain.choices[0].message.content == unset.choices[0].message.content


def test_streamed_response_format_assembles_to_valid_json(live) -> None:
    chunks = live.client().chat.completions.create(model=MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT,
                                                   temperature=1.0, seed=5, max_tokens=96, stream=True)
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads(text), CITY)


def test_structured_outputs_extra_on_both_endpoints(live) -> None:
    client = live.client()
    regex = r"[A-Z][a-z]{2,6} [0-9]{2}"
    completion = client.completions.create(model=MODEL, prompt=["The code is", "Answer:"], temperature=1.0, seed=2,
                                           max_tokens=32, extra_body={"structured_outputs": {"regex": regex}})
    for choice in completion.choices:
        assert choice.finish_reason == "stop" and re.fullmatch(regex, choice.text), choice.text
    choices = ["red", "green", "blue"]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, seed=4, n=3, max_tokens=8,
                                          extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in chat.choices)
    grammar = 'start: "x=" /[0-9]{1,3}/ ";"'
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=16,
                                          extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"x=[0-9]{1,3};", chat.choices[0].message.content)
    schema = {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3}
    completion = client.completions.create(model=MODEL, prompt="List:", temperature=1.0, seed=9, max_tokens=32,
                                           extra_body={"structured_outputs": {"json": json.dumps(schema)}})
    jsonschema.validate(json.loads(completion.choices[0].text), schema)
    # response_format on completions too, as vLLM accepts it.
    completion = client.completions.create(model=MODEL, prompt="A city:", temperature=1.0, seed=3, max_tokens=96,
                                           extra_body={"response_format": RESPONSE_FORMAT})
    jsonschema.validate(json.loads(completion.choices[0].text), CITY)


@pytest.mark.parametrize(("path", "extra", "param"), [
    (CHAT, {"response_format": {"type": "yaml"}}, "response_format.type"),
    (CHAT, {"response_format": {"type": "json_schema"}}, "response_format"),  # no json_schema
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),  # compiled by the engine: an invalid schema
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format.json_schema.schema"),
    (CHAT, {"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    (CHAT, {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
    (CHAT, {"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    (COMPLETIONS, {"response_format": {"type": "yaml"}}, "response_format.type"),
    (COMPLETIONS, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}},
     "response_format"),
    (COMPLETIONS, {"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    (COMPLETIONS, {"structured_outputs": {}}, "structured_outputs"),
    (COMPLETIONS, {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    (COMPLETIONS, {"structured_outputs": {"choice": []}}, "structured_outputs"),
    (COMPLETIONS, {"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    (COMPLETIONS, {"structured_outputs": {"json": {"$ref": "#/nowhere"}}}, "structured_outputs"),
    (COMPLETIONS, {"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs"),
    (COMPLETIONS, {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    (COMPLETIONS, {"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
    (COMPLETIONS, {"structured_outputs": {"regex": "a\ud800"}}, "structured_outputs.regex"),  # a lone surrogate
    (CHAT, {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "\ud800"}}}},
     "response_format.json_schema.schema.pattern"),
])
def test_bad_constraints_are_400_naming_the_field(live, path: str, extra: dict, param: str) -> None:
    base = {"messages": MESSAGES} if path == CHAT else {"prompt": "Hi"}
    error = assert_openai_error(post(live.url, path, {**base, "max_tokens": 4, **extra}), 400, param)
    assert error["type"] == "invalid_request_error"
    # The server goes on serving.
    assert post(live.url, COMPLETIONS, {"prompt": "Hi", "max_tokens": 2}).status_code == 200
