"""Clients that leave: their requests are aborted within a step and no KV block leaks, under load too."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx
from serve_harness import GREEDY_MAX_TOKENS, GREEDY_PROMPTS, MODEL, scrape, wait_for_idle

ABORTS = 'kvserve:request_success_total{finished_reason="abort"}'
LENGTHS = 'kvserve:request_success_total{finished_reason="length"}'
GENERATED = "kvserve:generation_tokens_total"


def _wait_until_running(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if samples["kvserve:num_requests_running"] >= 1 and samples[GENERATED] > 0:
            return samples
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)


def _open_request(url: str, body: dict) -> socket.socket:
    """Send a request on a raw socket and leave it unread, so that closing it is a disconnect."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def _check_abort_within_a_step(live, body: dict) -> None:
    before = wait_for_idle(live.url)
    sock = _open_request(live.url, body)
    _wait_until_running(live.url)
    # Let a few tokens pass, then leave; the counter read at the moment of leaving bounds the waste.
    time.sleep(0.3)
    at_close = scrape(live.url)[GENERATED]
    sock.close()
    after = wait_for_idle(live.url, timeout_s=10)
    assert after["kvserve:num_requests_running"] == 0 and after["kvserve:kv_cache_usage_ratio"] == 0
    assert after[ABORTS] == before.get(ABORTS, 0) + 1
    # Alone in the batch, one step is one token: the step in flight plus at most one more.
    assert after[GENERATED] - at_close <= 2
    assert after[GENERATED] - before[GENERATED] < body["max_tokens"]


def test_non_streaming_client_disconnect_aborts_within_a_step(live) -> None:
    _check_abort_within_a_step(live, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400,
                                      "ignore_eos": True})


def test_streaming_client_disconnect_aborts_within_a_step(live) -> None:
    _check_abort_within_a_step(live, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400,
                                      "ignore_eos": True, "stream": True})


async def _client(client: httpx.AsyncClient, url: str, prompt: str, leave_after: int | None) -> dict | None:
    """Stream one completion; leave after `leave_after` events (None: read to [DONE])."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": GREEDY_MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    text, finish, usage, done, events = "", None, None, False, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        if leave_after == 0:
            return None  # before the first token: the request may still be waiting or in prefill
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if leave_after is not None and events >= leave_after:
                return None  # leaving the block closes the connection mid-stream
            events += 1
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    return {"text": text, "finish": finish, "usage": usage, "done": done}


async def _crowd(url: str, prompts: list[str], leave_after: list[int | None]) -> list[dict | None]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=180, limits=limits) as client:
        return await asyncio.gather(*(_client(client, url, p, k) for p, k in zip(prompts, leave_after, strict=True)))


def test_32_streams_with_a_third_disconnecting(live) -> None:
    rng = random.Random(1234)
    num_clients = 32
    prompts = [GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)] for i in range(num_clients)]
    # Every third client leaves after 0..8 events (0: right after the headers), well before the end.
    leave_after = [rng.randint(0, 8) if i % 3 == 0 else None for i in range(num_clients)]
    num_leaving = sum(k is not None for k in leave_after)
    before = wait_for_idle(live.url)
    results = asyncio.run(_crowd(live.url, prompts, leave_after))
    after = wait_for_idle(live.url)
    for prompt, plan, result in zip(prompts, leave_after, results, strict=True):
        if plan is not None:
            assert result is None
            continue
        # Batched with 31 others, aborts included, each answer is still exactly the greedy one alone.
        assert result["done"] and result["finish"] == "length"
        assert result["text"] == live.expected[prompt].text
        assert result["usage"]["completion_tokens"] == GREEDY_MAX_TOKENS
    assert after["kvserve:num_requests_running"] == 0
    assert after["kvserve:num_requests_waiting"] == 0
    assert after["kvserve:kv_cache_usage_ratio"] == 0
    assert after[ABORTS] - before.get(ABORTS, 0) == num_leaving
    assert after[LENGTHS] - before.get(LENGTHS, 0) == num_clients - num_leaving
