"""The public engine API on the bundled SmolLM2-135M: input validation, no leaked KV blocks, seeded
sampling, stop conditions, logprobs, streaming, metrics and the shapes `generate()` accepts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from kvserve import LLM, RequestOutput, SamplingParams

PARIS = "The capital of France is"
NUM_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=NUM_TOKENS, seed=1234, ignore_eos=True)
OTHER_PROMPTS = ["Once upon a time, in a small village by the sea,", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory=64 * 2**20, show_progress=False)


@pytest.fixture(scope="module")
def paris(llm: LLM) -> RequestOutput:
    """The greedy 16-token continuation of PARIS, generated alone: the reference for most tests."""
    return llm.generate(PARIS, GREEDY, use_tqdm=False)[0]


def test_show_progress_false_quiets_generate_too(llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    llm.generate(PARIS, GREEDY)
    assert "Generating" not in capsys.readouterr().err
    llm.generate(PARIS, GREEDY, use_tqdm=True)  # asked for
    assert "Generating" in capsys.readouterr().err


def run(llm: LLM, prompts, params=GREEDY) -> list[RequestOutput]:
    return llm.generate(prompts, params, use_tqdm=False)


def token_ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in run(llm, prompts, params)]


def assert_idle(llm: LLM) -> None:
    """Nothing queued or running, and every KV block back in the pool."""
    assert llm.stats().kv_blocks_used == 0
    assert llm.engine.scheduler.num_unfinished == 0
    assert not llm.engine.has_unfinished_requests()


def assert_serving(llm: LLM, paris: RequestOutput) -> None:
    """The engine is idle and a normal request right after still produces the reference tokens."""
    assert_idle(llm)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert token_ids(llm, PARIS, params) == [paris.outputs[0].token_ids[:3]]
    assert_idle(llm)


def drain(llm: LLM) -> dict[str, RequestOutput]:
    """Step the engine until idle; the final output of every request that finished."""
    finished = {}
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


# ---- 1. bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}, {"prompt": ""}],
                         ids=["empty-str", "empty-ids", "empty-prompt-dict"])
def test_empty_prompt_rejected(llm, paris, prompt):
    with pytest.raises(ValueError, match=r"^prompt must not be empty"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_serving(llm, paris)


def test_empty_batch_returns_nothing(llm):
    assert llm.generate([], GREEDY, use_tqdm=False) == []


def test_prompt_longer_than_max_model_len_rejected(llm, paris):
    max_len = llm.engine.max_model_len
    assert max_len == 1456  # 64 MiB of float32 KV for SmolLM2-135M: 91 blocks of 16 tokens
    with pytest.raises(ValueError, match=rf"prompt has {max_len} tokens; max_model_len is {max_len}"):
        llm.generate({"prompt_token_ids": [504] * max_len}, GREEDY, use_tqdm=False)
    assert_serving(llm, paris)


def test_max_tokens_past_the_context_rejected_not_capped(llm, paris):
    # The same rule as the server's 400 (kvserve/inputs.py): prompt + max_tokens must fit in max_model_len.
    max_len = llm.engine.max_model_len
    num_prompt = len(paris.prompt_token_ids)
    with pytest.raises(ValueError, match=rf"^max_tokens is {max_len}, but the prompt's {num_prompt} tokens leave "
                                         rf"room for {max_len - num_prompt} .*\(max_model_len {max_len}\)"):
        llm.generate(PARIS, SamplingParams(max_tokens=max_len), use_tqdm=False)
    assert_serving(llm, paris)


@pytest.mark.parametrize("bad_id", [49152, 49152 + 5, -1])
def test_out_of_vocab_prompt_token_rejected(llm, paris, bad_id):
    vocab = llm.engine.model_config.vocab_size
    assert vocab == 49152
    with pytest.raises(ValueError, match=rf"prompt_token_ids must be in \[0, {vocab}\), got {bad_id}"):
        llm.generate({"prompt_token_ids": [504, bad_id, 30]}, GREEDY, use_tqdm=False)
    assert_serving(llm, paris)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"max_tokens": 0}, r"max_tokens must be >= 1, got 0"),
    ({"temperature": -1}, r"temperature must be >= 0, got -1"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -2}, r"top_k must be -1 .*>= 1, got -2"),
])
def test_bad_sampling_params_rejected(llm, paris, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kwargs)
    assert_serving(llm, paris)


def test_unknown_stop_token_id_rejected(llm, paris):
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(max_tokens=4, stop_token_ids=[30, vocab + 5])
    with pytest.raises(ValueError, match=rf"stop_token_ids must be in \[0, {vocab}\), got {vocab + 5}"):
        llm.generate(PARIS, params, use_tqdm=False)
    assert_serving(llm, paris)


def test_unknown_engine_option_rejected_before_loading():
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['foo'\]; known: .*'block_size'"):
        LLM(foo=1)
    with pytest.raises(ValueError, match=r"block_size must be >= 1, got 0"):
        LLM(block_size=0)


def test_duplicate_request_id_rejected_and_first_request_unharmed(llm, paris):
    llm.engine.add_request("dup", PARIS, GREEDY)
    with pytest.raises(ValueError, match=r"request_id 'dup' is already in use"):
        llm.engine.add_request("dup", "Hello", GREEDY)
    finished = drain(llm)
    assert list(finished) == ["dup"]
    assert finished["dup"].prompt == PARIS
    assert finished["dup"].outputs[0].token_ids == paris.outputs[0].token_ids
    assert_serving(llm, paris)
    # A finished request's id may be reused.
    llm.engine.add_request("dup", PARIS, SamplingParams(temperature=0, max_tokens=2))
    assert drain(llm)["dup"].outputs[0].token_ids == paris.outputs[0].token_ids[:2]


def test_request_id_colliding_with_a_sample_id_of_an_n2_request_rejected(llm, paris):
    # An n=2 request "c" runs as "c#0" and "c#1" inside the engine: a user id "c#0" must not
    # silently replace the first sample in the scheduler and the KV manager.
    llm.engine.add_request("c", PARIS, SamplingParams(n=2, max_tokens=4, seed=3, ignore_eos=True))
    try:
        with pytest.raises(ValueError, match=r"request_id 'c#0'"):
            llm.engine.add_request("c#0", PARIS, GREEDY)
    finally:
        llm.engine.abort_request("c")
        llm.engine.abort_request("c#0")
        # Where the collision is accepted (the bug), a copy of "c#0" stays queued that no abort can
        # reach and that breaks every later step with a KeyError: drop it so the module can go on.
        scheduler = llm.engine.scheduler
        for request in [r for r in scheduler.waiting if r.request_id not in scheduler.requests]:
            scheduler.waiting.remove(request)
    assert_serving(llm, paris)


def test_batch_with_one_bad_prompt_queues_nothing(llm, paris):
    # generate() must validate the whole batch, or abort what it queued: otherwise the good
    # prompts stay in the engine and run (unseen) inside the next call.
    try:
        with pytest.raises(ValueError, match=r"^prompt must not be empty"):
            llm.generate([PARIS, ""], GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
    finally:
        drain(llm)  # where the bug is: run the orphan out, so later tests start idle
    assert_serving(llm, paris)


# ---- 2. no leaked KV blocks ------------------------------------------------------------------


def test_no_leaked_blocks_after_length_stop_abort_and_failure(llm, paris, monkeypatch):
    text = paris.outputs[0].text
    stop = text[len(text) // 2:][:5]
    engine = llm.engine
    engine.add_request("length-a", PARIS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.add_request("length-b", OTHER_PROMPTS[0], SamplingParams(max_tokens=12, seed=5, ignore_eos=True))
    engine.add_request("stop", PARIS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, stop=stop))
    engine.add_request("abort", OTHER_PROMPTS[1], SamplingParams(max_tokens=32, seed=6, ignore_eos=True))
    num_abort_tokens = 0
    for _ in range(3):
        for output in engine.step():
            assert not output.finished
            if output.request_id == "abort":
                num_abort_tokens = len(output.outputs[0].token_ids)
    assert num_abort_tokens == 3  # the prompt fits one step, then one token per step
    assert llm.stats().kv_blocks_used > 0
    engine.abort_request("abort")
    finished = drain(llm)
    assert sorted(finished) == ["length-a", "length-b", "stop"]
    assert [finished[i].outputs[0].finish_reason for i in ("length-a", "length-b", "stop")] == \
        ["length", "length", "stop"]
    assert len(finished["length-b"].outputs[0].token_ids) == 12
    assert_idle(llm)

    # A step that raises fails the requests it scheduled, and only those.
    original = engine.runner.execute
    calls = []

    def fail_once(scheduled):
        calls.append(sorted(scheduled.num_scheduled_tokens))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return original(scheduled)

    monkeypatch.setattr(engine.runner, "execute", fail_once)
    engine.add_request("fail-a", PARIS, GREEDY)
    engine.add_request("fail-b", "Hello", GREEDY)
    outputs = engine.step()
    assert calls == [["fail-a", "fail-b"]]
    assert sorted(o.request_id for o in outputs) == ["fail-a", "fail-b"]
    for output in outputs:
        assert output.finished and output.error == "RuntimeError: boom"
        assert output.outputs[0].finish_reason == "error" and output.outputs[0].token_ids == []
    assert_idle(llm)
    monkeypatch.undo()
    assert engine.runner.execute == original
    assert_serving(llm, paris)


# ---- 3. sampling -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled_alone(llm: LLM) -> list[int]:
    return token_ids(llm, PARIS, SAMPLED)[0]


def test_same_seed_same_tokens_alone_and_in_any_batch_position(llm, paris, sampled_alone):
    assert len(sampled_alone) == NUM_TOKENS
    assert sampled_alone != paris.outputs[0].token_ids  # it really sampled
    unseeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=NUM_TOKENS, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, max_tokens=NUM_TOKENS, seed=99, ignore_eos=True)
    others = [(OTHER_PROMPTS[0], unseeded), (OTHER_PROMPTS[1], seeded)]
    for position in range(3):
        batch = list(others)
        batch.insert(position, (PARIS, SAMPLED))
        prompts, params = zip(*batch, strict=True)
        outputs = run(llm, list(prompts), list(params))
        assert outputs[position].outputs[0].token_ids == sampled_alone
    assert_idle(llm)


def test_different_seeds_differ(llm, sampled_alone):
    other = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=NUM_TOKENS, seed=4321, ignore_eos=True)
    assert token_ids(llm, PARIS, other)[0] != sampled_alone


def test_n2_with_seed_returns_two_reproducible_completions(llm):
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
    [first] = run(llm, PARIS, params)
    assert first.finished
    assert [c.index for c in first.outputs] == [0, 1]
    assert [len(c.token_ids) for c in first.outputs] == [8, 8]
    assert first.outputs[0].token_ids != first.outputs[1].token_ids  # two samples, not one twice
    assert first.metrics.num_generation_tokens == 16
    [again] = run(llm, PARIS, params)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
    assert_idle(llm)


def test_greedy_equals_top_k_1(llm, paris):
    top_k_1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=NUM_TOKENS, seed=11, ignore_eos=True)
    assert token_ids(llm, PARIS, top_k_1) == [paris.outputs[0].token_ids]


# ---- 4. stop conditions ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stop_string(paris: RequestOutput) -> str:
    """Five characters from the middle of the greedy text."""
    text = paris.outputs[0].text
    stop = text[len(text) // 2:][:5]
    assert len(stop) == 5 and text.find(stop) > 0
    return stop


def test_stop_string_truncates_text(llm, paris, stop_string):
    full_text, full_ids = paris.outputs[0].text, paris.outputs[0].token_ids
    index = full_text.find(stop_string)
    [out] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, stop=stop_string))
    completion = out.outputs[0]
    assert completion.text == full_text[:index]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_string
    assert 0 < len(completion.token_ids) < NUM_TOKENS
    assert completion.token_ids == full_ids[: len(completion.token_ids)]
    [kept] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, stop=[stop_string, "zzzz"],
                                            include_stop_str_in_output=True))
    assert kept.outputs[0].text == full_text[: index + len(stop_string)]
    assert kept.outputs[0].finish_reason == "stop" and kept.outputs[0].stop_reason == stop_string
    assert kept.outputs[0].token_ids == completion.token_ids


def test_stop_string_in_the_last_allowed_token_reports_stop(llm, paris, stop_string):
    # The token that completes the stop string is also the max_tokens-th: the text is cut at the
    # stop string, so the reason must say "stop" (as vLLM does), not "length".
    full_text = paris.outputs[0].text
    [probe] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, stop=stop_string))
    num_tokens = len(probe.outputs[0].token_ids)
    [out] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=num_tokens, stop=stop_string))
    completion = out.outputs[0]
    assert completion.text == full_text[: full_text.find(stop_string)]
    assert len(completion.token_ids) == num_tokens
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_string)


def test_stop_token_id_ends_after_that_token(llm, paris):
    full_ids = paris.outputs[0].token_ids
    stop_id = full_ids[4]
    assert full_ids.index(stop_id) == 4  # its first occurrence, so the stop must happen exactly there
    [out] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, stop_token_ids=[stop_id]))
    completion = out.outputs[0]
    assert completion.token_ids == full_ids[:5]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id


def test_max_tokens_finishes_with_length(llm, paris):
    [out] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=7))
    completion = out.outputs[0]
    assert completion.token_ids == paris.outputs[0].token_ids[:7]
    assert completion.finish_reason == "length" and completion.stop_reason is None
    assert paris.outputs[0].finish_reason == "length" and len(paris.outputs[0].token_ids) == NUM_TOKENS


def test_chat_answer_ends_at_eos_without_eos_text(llm):
    [out] = llm.chat([{"role": "user", "content": "What is 2 + 2?"}],
                     SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason is None
    assert len(completion.token_ids) < 32
    assert completion.token_ids[-1] in llm.engine.eos_token_ids
    assert not any(t in llm.engine.eos_token_ids for t in completion.token_ids[:-1])
    assert "4" in completion.text
    assert "<|" not in completion.text and "im_end" not in completion.text
    assert completion.text == llm.get_tokenizer().decode(completion.token_ids[:-1])


# ---- 5. logprobs -----------------------------------------------------------------------------


def check_logprobs(completion, num: int, is_greedy: bool) -> None:
    assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
    for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert token in entry
        assert num <= len(entry) <= num + 1  # the top `num`, plus the sampled token if not among them
        assert all(v <= 0 for v in entry.values())
        assert sum(math.exp(v) for v in entry.values()) <= 1 + 1e-4
        if is_greedy:
            assert entry[token] == max(entry.values())


def test_logprobs_greedy_and_sampled(llm, paris, sampled_alone):
    [greedy] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3))
    assert greedy.outputs[0].token_ids == paris.outputs[0].token_ids[:8]
    check_logprobs(greedy.outputs[0], 3, is_greedy=True)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=NUM_TOKENS, seed=1234, ignore_eos=True,
                            logprobs=3)
    [sampled] = run(llm, PARIS, params)
    assert sampled.outputs[0].token_ids == sampled_alone  # asking for logprobs changes no token
    check_logprobs(sampled.outputs[0], 3, is_greedy=False)
    [only] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0))
    assert [list(entry) for entry in only.outputs[0].logprobs] == [[t] for t in only.outputs[0].token_ids]
    assert paris.outputs[0].logprobs is None


# ---- 6. streaming ----------------------------------------------------------------------------


def collect(stream: Iterator[RequestOutput]) -> list[RequestOutput]:
    outputs = list(stream)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    return outputs


def test_stream_deltas_add_up_to_final_output(llm, paris):
    outputs = collect(llm.stream(PARIS, GREEDY))
    assert len(outputs) == NUM_TOKENS  # one output per generated token
    final = outputs[-1].outputs[0]
    assert "".join(o.outputs[0].delta_text for o in outputs) == final.text == paris.outputs[0].text
    assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert final.token_ids == paris.outputs[0].token_ids
    assert_idle(llm)


def test_stream_with_stop_string_never_sends_the_stop_string(llm, paris, stop_string):
    outputs = collect(llm.stream(PARIS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, stop=stop_string)))
    final = outputs[-1].outputs[0]
    full_text = paris.outputs[0].text
    assert "".join(o.outputs[0].delta_text for o in outputs) == final.text == full_text[: full_text.find(stop_string)]
    assert final.finish_reason == "stop"


def test_chat_offers_tools_in_the_prompt(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = llm.get_tokenizer().decode(llm.apply_chat_template(messages, tools))
    assert "get_weather" in with_tools and "<tool_call>" in with_tools
    assert "get_weather" not in llm.get_tokenizer().decode(llm.apply_chat_template(messages))
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, tools=tools)[0]
    assert output.prompt_token_ids == llm.apply_chat_template(messages, tools)


def test_stream_chinese_chat_has_no_partial_characters(llm):
    ids = llm.apply_chat_template([{"role": "user", "content": "请用中文写一句关于春天的话。"}])
    outputs = collect(llm.stream({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=32)))
    deltas = [o.outputs[0].delta_text for o in outputs]
    final = outputs[-1].outputs[0]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == final.text
    assert "春" in final.text and "\ufffd" not in final.text
    assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert len(final.token_ids) == len(outputs)


def test_closing_a_stream_early_aborts_its_request(llm, paris):
    stream = llm.stream(PARIS, GREEDY)
    first = [next(stream) for _ in range(3)]
    assert [len(o.outputs[0].token_ids) for o in first] == [1, 2, 3]
    assert llm.engine.has_unfinished_requests() and llm.stats().kv_blocks_used > 0
    stream.close()
    assert_serving(llm, paris)


# ---- 7. metrics and stats --------------------------------------------------------------------


def test_request_metrics(llm, paris):
    metrics = paris.metrics
    prompt_ids = llm.get_tokenizer().encode(PARIS)
    assert paris.prompt_token_ids == prompt_ids
    assert metrics.num_prompt_tokens == len(prompt_ids)
    assert metrics.num_generation_tokens == len(paris.outputs[0].token_ids) == NUM_TOKENS
    assert metrics.time_to_first_token > 0
    assert metrics.time_per_output_token > 0
    assert metrics.e2e_latency >= metrics.time_to_first_token
    assert metrics.queue_time is not None and 0 <= metrics.queue_time <= metrics.time_to_first_token
    assert metrics.num_preemptions == 0
    [one] = run(llm, PARIS, SamplingParams(temperature=0, max_tokens=1))
    assert one.metrics.num_generation_tokens == 1 and one.metrics.time_per_output_token is None


def test_engine_stats(llm, paris):
    stats = llm.stats()
    assert stats.kv_blocks_total == 91 and stats.kv_blocks_used == 0 and stats.kv_cache_usage == 0
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert 90e6 < stats.model_bytes < 100e6  # SmolLM2-135M's Q4_1 / Q8_0 blocks as in the file: about 97 MB
    assert 0 < stats.kv_cache_bytes <= 64 * 2**20
    assert stats.peak_rss_bytes > stats.model_bytes
    before = (stats.num_prompt_tokens, stats.num_generation_tokens)
    run(llm, PARIS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    after = llm.stats()
    assert (after.num_prompt_tokens - before[0], after.num_generation_tokens - before[1]) == \
        (len(paris.prompt_token_ids), 5)


# ---- 8. what generate() accepts -------------------------------------------------------------


def test_generate_accepts_strings_ids_and_dicts(llm, paris):
    expected = paris.outputs[0].token_ids[:4]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt_ids = llm.get_tokenizer().encode(PARIS)
    [single] = run(llm, PARIS, params)
    assert single.prompt == PARIS and single.prompt_token_ids == prompt_ids
    assert single.outputs[0].token_ids == expected
    [as_dict] = run(llm, {"prompt_token_ids": prompt_ids}, params)
    assert as_dict.prompt is None and as_dict.prompt_token_ids == prompt_ids
    assert as_dict.outputs[0].token_ids == expected
    [bare_ids] = run(llm, prompt_ids, params)
    assert bare_ids.prompt_token_ids == prompt_ids and bare_ids.outputs[0].token_ids == expected
    prompts = [OTHER_PROMPTS[0], PARIS, OTHER_PROMPTS[1]]
    outputs = run(llm, prompts, params)
    assert [o.prompt for o in outputs] == prompts
    assert len({o.request_id for o in outputs}) == 3
    assert outputs[1].outputs[0].token_ids == expected


def test_generate_with_one_sampling_params_per_prompt(llm, paris):
    prompts = [OTHER_PROMPTS[0], PARIS, OTHER_PROMPTS[1]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 5, 3)]
    outputs = run(llm, prompts, params)
    assert [o.prompt for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == [2, 5, 3]
    assert outputs[1].outputs[0].token_ids == paris.outputs[0].token_ids[:5]
    with pytest.raises(ValueError, match=r"sampling_params has 2 entries for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)
    assert_serving(llm, paris)
