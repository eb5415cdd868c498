"""echo, prompt logprobs, logit_bias, best_of and repetition_penalty through the official `openai` client
and raw HTTP, against the live server (the bundled model)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from logprobs_reference import full_forward_logprobs
from serve_harness import GREEDY_MAX_TOKENS, GREEDY_PROMPTS, MODEL, assert_openai_error, wait_for_idle

PROMPT = GREEDY_PROMPTS[0]  # "The capital of France is": ASCII, so its tokens spell it exactly
GREEDY = {"temperature": 0, "max_tokens": GREEDY_MAX_TOKENS, "extra_body": {"ignore_eos": True}}
ATOL = 2e-4


@pytest.fixture(scope="module")
def reference(live) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and the oracle's logprobs [len, vocab], from one plain forward while the server idles."""
    wait_for_idle(live.url)  # the engine thread blocks on its queue: the model is ours for a moment
    ids = live.tokenizer.encode(PROMPT)
    return ids, full_forward_logprobs(live.llm.engine.runner, ids)


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json={"model": MODEL, **body}, timeout=60)


def check_echoed_logprobs(logprobs, ids: list[int], reference: torch.Tensor, num_top: int) -> None:
    """The legacy object over the prompt: null for the first token, then the oracle's values."""
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset[:len(ids)] == [len("".join(logprobs.tokens[:i])) for i in range(len(ids))]
    for position in range(1, len(ids)):
        row = reference[position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(row[ids[position]].item(), abs=ATOL)
        top = logprobs.top_logprobs[position]
        assert len(top) == num_top
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(num_top).values.tolist(), abs=ATOL)


def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(live, reference) -> None:
    """What lm-evaluation-harness's local-completions sends for loglikelihood."""
    ids, oracle = reference
    response = live.client().completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0,
                                                temperature=0)
    choice = response.choices[0]
    assert choice.text == PROMPT
    assert choice.finish_reason == "length"
    assert "".join(choice.logprobs.tokens) == PROMPT and len(choice.logprobs.tokens) == len(ids)
    check_echoed_logprobs(choice.logprobs, ids, oracle, 1)
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == 0 and response.usage.total_tokens == len(ids)


def test_echo_of_several_token_id_prompts_keeps_their_order(live, reference) -> None:
    ids, oracle = reference
    other = live.tokenizer.encode(GREEDY_PROMPTS[1])
    response = live.client().completions.create(model=MODEL, prompt=[ids, other], echo=True, logprobs=3,
                                                max_tokens=0)
    first, second = sorted(response.choices, key=lambda choice: choice.index)
    assert first.text == PROMPT and second.text == live.tokenizer.decode(other)
    check_echoed_logprobs(first.logprobs, ids, oracle, 3)
    assert len(second.logprobs.token_logprobs) == len(other)


def test_echo_with_one_generated_token_appends_it(live, reference) -> None:
    ids, oracle = reference
    expected = live.expected[PROMPT]
    response = live.client().completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=1,
                                                temperature=0)
    choice = response.choices[0]
    first_token = live.tokenizer.decode(expected.token_ids[:1])
    assert choice.text == PROMPT + first_token
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 1
    check_echoed_logprobs(logprobs, ids, oracle, 2)
    # The generated token's logprob comes from the sampler's path; the oracle's last row predicts it.
    assert logprobs.token_logprobs[-1] == pytest.approx(oracle[-1, expected.token_ids[0]].item(), abs=ATOL)
    assert logprobs.text_offset[-1] == len(PROMPT)
    assert response.usage.completion_tokens == 1


def test_echo_without_logprobs_prefixes_the_greedy_text(live) -> None:
    for prompt in GREEDY_PROMPTS:
        response = live.client().completions.create(model=MODEL, prompt=prompt, echo=True, **GREEDY)
        assert response.choices[0].text == prompt + live.expected[prompt].text
        assert response.choices[0].logprobs is None


def test_streamed_echo_opens_with_the_prompt(live, reference) -> None:
    ids, oracle = reference
    chunks = list(live.client().completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1,
                                                   stream=True, **GREEDY))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0].startswith(PROMPT)
    assert "".join(texts) == PROMPT + live.expected[PROMPT].text
    first = chunks[0].choices[0].logprobs
    assert len(first.tokens) == len(ids) + 1  # the prompt and the first generated token
    check_echoed_logprobs(first, ids, oracle, 1)
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and len(offsets) == len(ids) + GREEDY_MAX_TOKENS


def test_streamed_echo_only_sends_the_prompt_once(live) -> None:
    chunks = list(live.client().completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0,
                                                   stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts == [PROMPT, ""]
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "length"]
    assert chunks[-1].usage.completion_tokens == 0


def test_prompt_logprobs_extra_on_both_endpoints(live, reference) -> None:
    ids, oracle = reference
    body = post(live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2}).json()
    prompt_logprobs = body["choices"][0]["prompt_logprobs"]
    assert body["choices"][0]["text"] != PROMPT  # no echo: the text is the completion alone
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for position in range(1, len(ids)):
        entry = prompt_logprobs[position]
        row = oracle[position - 1]
        assert entry[str(ids[position])]["logprob"] == pytest.approx(row[ids[position]].item(), abs=ATOL)
        top_ids = row.topk(2).indices.tolist()
        ranked = sorted((value["rank"], int(key)) for key, value in entry.items() if value["rank"] is not None)
        assert [rank for rank, _ in ranked] == [1, 2]
        assert ranked[0][1] == top_ids[0]
        assert all(value["decoded_token"] for value in entry.values())
    chat_ids = live.llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    chat = post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                                               "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == len(chat_ids) and chat["prompt_logprobs"][0] is None
    assert all(list(entry) == [str(token)] for entry, token in zip(chat["prompt_logprobs"][1:], chat_ids[1:],
                                                                     strict=True))
    plain = post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 1}).json()
    assert "prompt_logprobs" not in plain and "prompt_logprobs" not in plain["choices"][0]


def test_logit_bias_forces_and_forbids_tokens(live) -> None:
    client = live.client()
    forced = live.tokenizer.encode(" banana")[0]
    response = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4,
                                         logit_bias={str(forced): 100})
    assert live.tokenizer.encode(response.choices[0].text) == [forced] * 4
    greedy_first = live.expected[PROMPT].token_ids[0]
    response = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=1,
                                         logit_bias={str(greedy_first): -100}, logprobs=0)
    assert response.choices[0].text != live.tokenizer.decode([greedy_first])
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                          max_tokens=3, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == " banana" * 3


@pytest.mark.parametrize("bias", [{"abc": 1}, {" 5": 1}, {"-1": 1}, {"5": 101}, {"5": -100.5}, {"5": "x"},
                                  {"100000000": 1}, {str(i): 1 for i in range(301)}, [1, 2]])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_logit_bias_is_400(live, path: str, bias: object) -> None:
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    response = httpx.post(f"{live.url}{path}", content=json.dumps({**body, "logit_bias": bias}),
                          headers={"Content-Type": "application/json"}, timeout=60)
    error = assert_openai_error(response, 400)
    assert error["param"].startswith("logit_bias")  # a mistyped value is named exactly: logit_bias.5


@pytest.mark.parametrize(("body", "param"), [
    ({"best_of": 2}, "best_of"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
])
def test_unsupported_or_out_of_range_is_400(live, body: dict, param: str) -> None:
    error = assert_openai_error(post(live, "/v1/completions", {"prompt": PROMPT, **body}), 400, param)
    assert param in error["message"]
    if param == "best_of":
        assert "not supported" in error["message"]


def test_best_of_equal_to_n_and_tiny_repetition_penalty_are_served(live) -> None:
    response = post(live, "/v1/completions", {"prompt": PROMPT, "best_of": 2, "n": 2, "max_tokens": 2})
    assert response.status_code == 200 and len(response.json()["choices"]) == 2
    assert post(live, "/v1/completions", {"prompt": PROMPT, "best_of": None, "max_tokens": 1}).status_code == 200
    # 1e-300 is 0 in float32: every seen token with a positive logit goes to +inf. Unguarded, the softmax was NaN
    # and the argmax of NaNs took the lowest such id every time; now those tokens are sampled among themselves.
    response = post(live, "/v1/completions", {"prompt": PROMPT, "repetition_penalty": 1e-300, "max_tokens": 8,
                                              "temperature": 1.0, "seed": 3})
    choice = response.json()["choices"][0]
    assert response.status_code == 200 and choice["finish_reason"] == "length"
    seen = set(live.tokenizer.encode(PROMPT))
    generated = live.tokenizer.encode(choice["text"])
    assert set(generated) <= seen  # the answer repeats the prompt's tokens
    assert len(set(generated)) > 1  # sampled, not the first NaN's index again and again
