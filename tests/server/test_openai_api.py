"""The endpoints through the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import httpx
from serve_harness import CHAT_MESSAGES, GREEDY_MAX_TOKENS, GREEDY_PROMPTS, MODEL

GREEDY = {"temperature": 0, "max_tokens": GREEDY_MAX_TOKENS, "extra_body": {"ignore_eos": True}}


def test_health_and_models(live) -> None:
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    models = live.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "kvserve"


def test_greedy_completions_equal_llm_generate(live) -> None:
    client = live.client()
    for prompt in GREEDY_PROMPTS:
        expected = live.expected[prompt]
        response = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
        assert response.choices[0].text == expected.text
        assert response.choices[0].finish_reason == "length"
        assert response.usage.prompt_tokens == len(live.tokenizer.encode(prompt))
        assert response.usage.completion_tokens == GREEDY_MAX_TOKENS
        assert response.usage.total_tokens == response.usage.prompt_tokens + GREEDY_MAX_TOKENS
        assert response.usage.prompt_tokens_details.cached_tokens < response.usage.prompt_tokens
        assert response.id.startswith("cmpl-") and response.object == "text_completion"
        assert response.model == MODEL


def test_streamed_completion_equals_llm_generate(live) -> None:
    prompt = GREEDY_PROMPTS[0]
    chunks = list(live.client().completions.create(model=MODEL, prompt=prompt, stream=True,
                                                   stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == live.expected[prompt].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == GREEDY_MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_equals_llm_chat_and_counts_usage(live) -> None:
    response = live.client().chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, temperature=0,
                                                     max_tokens=GREEDY_MAX_TOKENS)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == live.expected_chat.text
    assert choice.finish_reason == live.expected_chat.finish_reason
    assert response.usage.prompt_tokens == len(live.llm.apply_chat_template(CHAT_MESSAGES))
    assert response.usage.completion_tokens == len(live.expected_chat.token_ids)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")


def test_repeated_prompt_reports_cached_tokens(live) -> None:
    client = live.client()
    messages = [{"role": "user", "content": "Name three colours of the rainbow, please, in order."}]
    usages = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).usage for _ in range(2)]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    usages.append(chunks[-1].usage)
    # The second and third find the prompt's full blocks (all but the last token at most) in the prefix cache.
    for usage in usages[1:]:
        assert 16 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_chat_stream_shape(live) -> None:
    stream = live.client().chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, temperature=0,
                                                   max_tokens=GREEDY_MAX_TOKENS, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and first.finish_reason is None
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == live.expected_chat.text
    last_choice = [c for c in chunks if c.choices][-1].choices[0]
    assert last_choice.finish_reason == live.expected_chat.finish_reason
    assert last_choice.delta.content is None and last_choice.delta.role is None
    assert chunks[-1].usage.completion_tokens == len(live.expected_chat.token_ids)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_max_completion_tokens_gives_length(live) -> None:
    response = live.client().chat.completions.create(model=MODEL, messages=CHAT_MESSAGES,
                                                     max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_n2_non_streamed_and_streamed(live) -> None:
    client = live.client()
    response = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=6, seed=3,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert response.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, n=2, max_tokens=4,
                                                 seed=3, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert sorted(roles) == [0, 1] and finished == [0, 1]


def test_stop_string_ends_with_stop(live) -> None:
    prompt = GREEDY_PROMPTS[0]
    expected = live.expected[prompt].text  # " Paris.\n\nThe answer is: ..."
    response = live.client().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                                stop=["\n\n", "zzz"])
    assert response.choices[0].text == expected[:expected.index("\n\n")]
    assert response.choices[0].finish_reason == "stop"
    response = live.client().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                                stop=".")
    assert response.choices[0].text == expected[:expected.index(".")]


def test_stop_token_ids_extra_body(live) -> None:
    prompt = GREEDY_PROMPTS[0]
    token_ids = live.expected[prompt].token_ids
    stop_id = token_ids[3]
    response = live.client().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                                extra_body={"stop_token_ids": [stop_id], "top_k": 5,
                                                            "min_p": 0.01, "repetition_penalty": 1.0})
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == token_ids.index(stop_id) + 1  # the stop token counts


def test_seed_reproducible(live) -> None:
    client = live.client()
    texts = [client.completions.create(model=MODEL, prompt="My favourite animal is", temperature=1.0,
                                       max_tokens=10, seed=1234, extra_body={"ignore_eos": True}).choices[0].text
             for _ in range(2)]
    assert texts[0] == texts[1]


def test_chat_logprobs(live) -> None:
    response = live.client().chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, temperature=0,
                                                     max_tokens=5, logprobs=True, top_logprobs=3,
                                                     extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    for position in content:
        assert len(position.top_logprobs) == 3
        values = [t.logprob for t in position.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        # Greedy: the chosen token is the most likely one.
        assert position.token == position.top_logprobs[0].token
        assert position.logprob == values[0]
        assert bytes(position.bytes).decode("utf-8", "replace")


def test_completion_logprobs_streamed_and_whole(live) -> None:
    client = live.client()
    prompt = GREEDY_PROMPTS[0]
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=2,
                                      extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(whole.tokens) == len(whole.token_logprobs) == len(whole.top_logprobs) == 4
    assert "".join(whole.tokens) == live.expected[prompt].text[:len("".join(whole.tokens))]
    assert all(len(top) == 2 for top in whole.top_logprobs)
    assert whole.text_offset[0] == 0 and whole.text_offset[1] == len(whole.tokens[0])
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=2,
                                            stream=True, extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == whole.tokens
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.text_offset


def test_chinese_streams_whole_characters(live) -> None:
    messages = [{"role": "user", "content": "请用中文回答：你好吗？"}]
    client = live.client()
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    text = whole.choices[0].message.content
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # the answer is Chinese
    deltas = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16, stream=True) if c.choices[0].delta.content]
    assert "".join(deltas) == text
    # A partial character is held back until its last byte: no delta but a truncated tail has U+FFFD.
    tail = len(deltas) - 1 if text.endswith("\ufffd") else len(deltas)
    assert all("\ufffd" not in d for d in deltas[:tail])
    assert len(deltas) < whole.usage.completion_tokens  # multi-token characters came as one delta


def test_completions_many_prompts_and_token_ids(live) -> None:
    client = live.client()
    response = client.completions.create(model=MODEL, prompt=GREEDY_PROMPTS[:2], n=1, **GREEDY)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts == [live.expected[p].text for p in GREEDY_PROMPTS[:2]]
    ids = live.tokenizer.encode(GREEDY_PROMPTS[0])
    response = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert response.choices[0].text == live.expected[GREEDY_PROMPTS[0]].text
    chunks = list(client.completions.create(model=MODEL, prompt=GREEDY_PROMPTS[:2], stream=True, **GREEDY))
    by_index = {0: "", 1: ""}
    for chunk in chunks:
        by_index[chunk.choices[0].index] += chunk.choices[0].text
    assert [by_index[0], by_index[1]] == [live.expected[p].text for p in GREEDY_PROMPTS[:2]]


def test_user_field_and_unknown_fields_accepted(live) -> None:
    response = httpx.post(f"{live.url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "developer", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 2, "user": "someone", "response_format": {"type": "text"}, "store": False,
        "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True, "modalities": ["text"],
        "stream_options": None})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None
