"""Bad input, unknown models, API keys and overload: OpenAI-shaped errors, and the server still answers."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_harness import API_KEY, GREEDY_MAX_TOKENS, GREEDY_PROMPTS, MODEL, assert_openai_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = "hello " * 2000  # about 2,000 tokens: more than the 1,456-token context of the test engine


def post(url: str, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    # json.dumps escapes non-ASCII, so that a lone surrogate travels as "\ud800" (httpx's json= cannot send it).
    return httpx.post(f"{url}{path}", content=json.dumps(body), timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT, {}, "messages"),  # missing field
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "Hi"}, "messages"),  # mistyped
    (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    (CHAT, {"messages": MESSAGES, "temperature": -1}, "temperature"),  # out of range, from SamplingParams
    (CHAT, {"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": MESSAGES, "top_p": 0}, "top_p"),
    (CHAT, {"messages": MESSAGES, "n": 0}, "n"),
    (CHAT, {"messages": MESSAGES, "n": 1000}, "n"),  # too large
    (CHAT, {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),  # past the context window
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 1.5}, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "stream": "yes"}, "stream"),
    (CHAT, {"messages": MESSAGES, "presence_penalty": 3}, "presence_penalty"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "stop_token_ids": [10**7]}, "stop_token_ids"),  # from Engine.add_request
    (CHAT, {"messages": MESSAGES, "stop": [""]}, "stop"),
    (CHAT, {"messages": MESSAGES, "seed": 2**70}, "seed"),
    (CHAT, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, "messages"),  # prompt too long
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [10**8]}, "prompt"),  # token id past the vocabulary
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
    (COMPLETIONS, {"prompt": LONG_PROMPT}, "prompt"),
    (COMPLETIONS, {"prompt": "Hi", "logprobs": 100}, "logprobs"),
    (CHAT, {"messages": MESSAGES, "echo": True}, "echo"),  # echo is for /v1/completions
    (COMPLETIONS, {"prompt": "Hi", "min_tokens": 20, "max_tokens": 4}, "min_tokens"),
    # Lone surrogates: valid JSON escapes that no tokenizer can encode (were a 500 from the tokenizer).
    (COMPLETIONS, {"prompt": "a\ud800b"}, "prompt"),
    (COMPLETIONS, {"prompt": ["ok", "a\udfffb"]}, "prompt[1]"),
    (COMPLETIONS, {"prompt": "Hi", "stop": ["x", "\udc00"]}, "stop"),  # refused by the constrained str
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages[0].content[0].text"),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "name": "\ud800"}]}, "messages[0].name"),
    (CHAT, {"messages": MESSAGES, "stop": "a\ud800"}, "stop"),
    (CHAT, {"messages": MESSAGES, "stop": "a" * 1025}, "stop"),  # one stop string: at most 1,024 characters
    (COMPLETIONS, {"prompt": "Hi", "stop": ["x", "a" * 1025]}, "stop"),
    (COMPLETIONS, {"prompt": "Hi", "stop": ["a"] * 17}, "stop"),  # at most 16 of them
    (CHAT, {"messages": MESSAGES, "stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"prompt": "Hi", "stream": False, "stream_options": {}}, "stream_options"),
    # Fields that would change the answer and are not implemented: refused, not ignored.
    (CHAT, {"messages": MESSAGES, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (CHAT, {"messages": MESSAGES, "function_call": "auto"}, "function_call"),
    (CHAT, {"messages": MESSAGES, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"messages": MESSAGES, "modalities": ["text", "audio"]}, "modalities"),
    (CHAT, {"messages": MESSAGES, "prediction": {"type": "content", "content": "x"}}, "prediction"),
    (CHAT, {"messages": MESSAGES, "web_search_options": {}}, "web_search_options"),
])
def test_invalid_request_is_400_naming_the_field(live, path: str, body: dict, param: str) -> None:
    for stream in (False, True):  # a streamed request is validated before the stream starts
        error = assert_openai_error(post(live.url, path, {**body, "stream": stream} if "stream" not in body
                                         else body), 400, param)
        assert error["type"] == "invalid_request_error"
        assert param.split("[")[0].split(".")[0] in error["message"]


def test_lone_surrogate_keeps_the_connection(live) -> None:
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for _ in range(2):  # a 500 used to close the keep-alive connection; a 400 leaves it open
            response = client.post(COMPLETIONS, content=json.dumps({"prompt": "a\ud800b", "max_tokens": 2}),
                                   headers={"Content-Type": "application/json"})
            assert_openai_error(response, 400, "prompt")
            assert response.headers.get("connection") != "close"
        assert client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_single_stop_string_longer_than_16_characters(live) -> None:
    # The 16-item cap is for the list; it used to cap a single string's length as well.
    for stop in ("Observation: done", ["Observation: done"] * 16, "a" * 1024):
        for path, body in ((COMPLETIONS, {"prompt": "Hi"}), (CHAT, {"messages": MESSAGES})):
            response = post(live.url, path, {**body, "stop": stop, "max_tokens": 2})
            assert response.status_code == 200, response.text


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"null", b'{"prompt": "\xff\xfe"}'])
def test_invalid_json_is_400(live, raw: bytes) -> None:
    response = httpx.post(f"{live.url}{CHAT}", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


def test_unknown_model_is_404(live) -> None:
    error = assert_openai_error(post(live.url, CHAT, {"model": "gpt-4", "messages": MESSAGES}), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        live.client().completions.create(model="gpt-4", prompt="Hi")


def test_unknown_route_and_method(live) -> None:
    assert_openai_error(httpx.get(f"{live.url}/v1/nothing"), 404)
    assert_openai_error(httpx.delete(f"{live.url}/v1/models"), 405)


def test_openai_client_sees_bad_request(live) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        live.client().chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_api_key_required_on_v1_routes(live) -> None:
    url = live.keyed_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        for request in (lambda h: httpx.get(f"{url}/v1/models", headers=h),
                        lambda h: post(url, CHAT, {"messages": MESSAGES}, headers=h),
                        lambda h: httpx.post(f"{url}{COMPLETIONS}", content=b"{bad", headers=h)):
            error = assert_openai_error(request(headers), 401)
            assert error["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200  # open: load balancers probe it
    assert httpx.get(f"{url}/metrics").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = client.completions.create(model=MODEL, prompt=GREEDY_PROMPTS[0], temperature=0,
                                       max_tokens=GREEDY_MAX_TOKENS, extra_body={"ignore_eos": True})
    assert answer.choices[0].text == live.expected[GREEDY_PROMPTS[0]].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_no_waiting_place_serves_free_slots_and_refuses_what_never_fits(live) -> None:
    # max_waiting_requests=0 sheds only what would wait: with free slots the real engine serves (the 503s
    # of a full queue are tested on a paused fake engine, test_admission.py).
    answer = openai.OpenAI(base_url=f"{live.full_url}/v1", api_key="unused", max_retries=0).completions.create(
        model=MODEL, prompt=GREEDY_PROMPTS[0], temperature=0, max_tokens=GREEDY_MAX_TOKENS,
        extra_body={"ignore_eos": True})
    assert answer.choices[0].text == live.expected[GREEDY_PROMPTS[0]].text
    for stream in (False, True):
        response = post(live.full_url, COMPLETIONS, {"prompt": ["Hi"] * 64, "n": 16, "stream": stream})
        assert "sequences" in assert_openai_error(response, 400, "n")["message"]


def test_server_still_answers_after_errors(live) -> None:
    for body in ({"messages": MESSAGES, "n": 1000}, {"prompt": LONG_PROMPT}, {"messages": None}):
        assert post(live.url, CHAT if "messages" in body else COMPLETIONS, body).status_code == 400
    answer = live.client().completions.create(model=MODEL, prompt=GREEDY_PROMPTS[1], temperature=0,
                                              max_tokens=GREEDY_MAX_TOKENS, extra_body={"ignore_eos": True})
    assert answer.choices[0].text == live.expected[GREEDY_PROMPTS[1]].text
