"""/tokenize, /detokenize (vLLM's shapes) and max_model_len, on the bundled model."""

from __future__ import annotations

import httpx
import pytest
from serve_harness import API_KEY, CHAT_MESSAGES, GREEDY_PROMPTS, MODEL, assert_openai_error


def _post(url: str, path: str, body: dict, **kwargs: object) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_tokenize_a_prompt_and_back(live, prompt: str) -> None:
    response = _post(live.url, "/tokenize", {"model": MODEL, "prompt": prompt, "return_token_strs": True})
    assert response.status_code == 200, response.text
    body = response.json()
    tokens = live.tokenizer.encode(prompt)
    assert body == {"count": len(tokens), "max_model_len": live.llm.engine.max_model_len, "tokens": tokens,
                    "token_strs": live.tokenizer.convert_ids_to_tokens(tokens)}
    back = _post(live.url, "/detokenize", {"tokens": tokens})
    assert back.status_code == 200 and back.json() == {"prompt": prompt}


def test_tokenize_messages_as_the_chat_endpoint_renders_them(live) -> None:
    body = _post(live.url, "/tokenize", {"messages": CHAT_MESSAGES}).json()
    assert body["tokens"] == live.llm.apply_chat_template(CHAT_MESSAGES) and body["token_strs"] is None
    bare = _post(live.url, "/tokenize", {"messages": CHAT_MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"] and body["tokens"][:bare["count"]] == bare["tokens"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT_MESSAGES}, "prompt"),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_requests_are_400_naming_the_field(live, path: str, body: dict, param: str) -> None:
    assert_openai_error(_post(live.url, path, body), 400, param)


def test_other_model_is_404_and_the_key_is_required(live) -> None:
    assert_openai_error(_post(live.url, "/tokenize", {"model": "other", "prompt": "a"}), 404, "model")
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        assert_openai_error(_post(live.keyed_url, path, body), 401)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        assert _post(live.keyed_url, path, body, headers=headers).status_code == 200


def test_max_model_len_is_the_limit_the_server_enforces(live) -> None:
    max_model_len = live.llm.engine.max_model_len
    (card,) = httpx.get(f"{live.url}/v1/models", timeout=30).json()["data"]
    assert card["max_model_len"] == max_model_len
    prompt = _post(live.url, "/tokenize", {"prompt": GREEDY_PROMPTS[0]}).json()
    room = max_model_len - prompt["count"]
    too_long = _post(live.url, "/v1/completions", {"prompt": GREEDY_PROMPTS[0], "max_tokens": room + 1})
    error = assert_openai_error(too_long, 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and f"max_model_len {max_model_len}" in error["message"]
    # A prompt of max_model_len tokens leaves no room for a reply.
    ids = [prompt["tokens"][0]] * max_model_len
    assert_openai_error(_post(live.url, "/v1/completions", {"prompt": ids, "max_tokens": 1}), 400, "prompt")
