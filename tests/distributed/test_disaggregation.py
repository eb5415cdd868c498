"""Prefill/decode disaggregation: a prefill instance (`kvserve serve --role prefill`, a process of its own) and a
decode instance (here, in this process) linked over gloo. The decode instance's answers equal one instance's; a
prefix it holds is not fetched; a prefill instance that dies mid-transfer fails that request cleanly and the decode
instance goes on serving; no block is left held on the decode side."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from kvserve import LLM, SamplingParams
from kvserve.distributed.disaggregation import (
    DecodeConnector,
    PrefillUnavailableError,
    check_disaggregation,
    export_blocks,
    import_blocks,
    layout,
    missing_blocks,
)
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

LONG_PROMPT = [(7 * i) % 5000 + 10 for i in range(100)]  # six full blocks of 16, and a partial one
OPTIONS = {"kv_cache_memory": 8 * 2**20, "block_size": 16}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Pair:
    prefill: subprocess.Popen
    connector: DecodeConnector
    client: TestClient
    llm: LLM  # the decode instance's engine

    def complete(self, prompt: list[int], max_tokens: int = 16):
        return self.client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0, "ignore_eos": True})


@pytest.fixture
def pair(tiny_models) -> Iterator[Pair]:
    model = tiny_models["llama-gqa"]
    address = f"127.0.0.1:{free_port()}"
    prefill = subprocess.Popen([sys.executable, "-m", "kvserve.cli", "serve", "--model", model, "--role", "prefill",
                                "--kv-transfer-address", address, "--port", str(free_port()),
                                "--kv-cache-memory", str(OPTIONS["kv_cache_memory"]), "--num-threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    llm = LLM(model=model, show_progress=False, **OPTIONS)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(llm.engine, metrics)
    async_engine.start()
    connector = DecodeConnector(async_engine, address)
    try:
        deadline = time.monotonic() + 120
        while not connector.is_connected:
            assert prefill.poll() is None, prefill.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the prefill instance did not connect"
            time.sleep(0.1)
        with TestClient(build_app(async_engine, metrics, ServerConfig(served_model_name="tiny"), connector)) as client:
            yield Pair(prefill, connector, client, llm)
    finally:
        async_engine.shutdown()
        prefill.kill()
        prefill.wait(30)


@pytest.fixture(scope="module")
def expected(tiny_models) -> list[int]:
    """One plain instance's greedy answer to LONG_PROMPT."""
    llm = LLM(model=tiny_models["llama-gqa"], show_progress=False, **OPTIONS)
    (output,) = llm.generate([{"prompt_token_ids": LONG_PROMPT}], SamplingParams(temperature=0, max_tokens=16,
                                                                                 ignore_eos=True), use_tqdm=False)
    return output.outputs[0].token_ids


def test_decode_instance_answers_as_one_instance_from_fetched_blocks(pair, expected):
    response = pair.complete(LONG_PROMPT)
    assert response.status_code == 200, response.text
    assert pair.connector.num_fetched_blocks == 6  # (100 - 1) // 16 blocks, none cached here before
    assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 6 * 16
    assert pair.llm.engine.tokenizer.decode(expected) == response.json()["choices"][0]["text"]
    again = pair.complete(LONG_PROMPT)  # the prefix is here now: nothing is fetched
    assert again.json()["choices"][0]["text"] == response.json()["choices"][0]["text"]
    assert pair.connector.num_fetched_blocks == 6
    assert pair.complete([5, 42]).status_code == 200  # shorter than a block: prefilled here, nothing asked
    assert pair.connector.num_fetched_blocks == 6
    bad = pair.complete([10**7] * 40)  # refused as a single instance refuses it, after the prefill side did
    assert bad.status_code == 400 and "prompt must be in [0, 49153)" in bad.json()["error"]["message"], bad.text
    assert pair.llm.engine.kv_manager.pool.num_used_blocks == 0


def test_a_prefill_instance_dying_mid_transfer_fails_that_request_and_the_rest_prefill_here(pair, expected):
    os.kill(pair.prefill.pid, signal.SIGSTOP)  # the ask is sent, the answer never comes...
    asked = asyncio.new_event_loop()
    try:
        fetch = asked.create_task(pair.connector.prefetch([{"prompt_token_ids": LONG_PROMPT}]))
        asked.run_until_complete(asyncio.sleep(0.5))
        assert not fetch.done()
        os.kill(pair.prefill.pid, signal.SIGKILL)  # ...and the instance dies mid-transfer
        with pytest.raises(PrefillUnavailableError, match="the prefill instance is gone"):
            asked.run_until_complete(fetch)
    finally:
        asked.close()
    response = pair.complete(LONG_PROMPT)  # the decode instance goes on, prefilling here
    assert response.status_code == 200, response.text
    assert pair.llm.engine.tokenizer.decode(expected) == response.json()["choices"][0]["text"]
    assert pair.connector.num_fetched_blocks == 0
    assert pair.llm.engine.kv_manager.pool.num_used_blocks == 0


def test_a_request_cancelled_during_its_transfer_leaves_no_block_held(pair, expected):
    """The client leaves while the prefill instance works: the transfer completes on the link's thread (the link
    stays in step), nothing is imported, and the next request is served from the link as usual."""
    os.kill(pair.prefill.pid, signal.SIGSTOP)
    loop = asyncio.new_event_loop()
    try:
        fetch = loop.create_task(pair.connector.prefetch([{"prompt_token_ids": LONG_PROMPT}]))
        loop.run_until_complete(asyncio.sleep(0.3))
        fetch.cancel()
        os.kill(pair.prefill.pid, signal.SIGCONT)
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(fetch)
    finally:
        loop.close()
    assert pair.llm.engine.kv_manager.pool.num_used_blocks == 0
    response = pair.complete(LONG_PROMPT)
    assert pair.llm.engine.tokenizer.decode(expected) == response.json()["choices"][0]["text"]
    assert pair.connector.num_fetched_blocks == 6
    assert pair.llm.engine.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize(("case", "kv_cache_dtype"), [("llama-gqa", "auto"), ("llama-gqa", "int8"),
                                                      ("deepseek-v3-mla", "auto"), ("qwen2-moe", "fp8")])
def test_blocks_moved_between_engines_give_the_same_tokens(tiny_models, case, kv_cache_dtype):
    """The engine-side steps without the link: one engine computes the prompt, its blocks are read out and written
    into another engine's free blocks, which then answers from them as the first does from its own prefix (with a
    quantized cache, a prefix read back from the cache is not the prompt's fresh K/V: the same prefix hit is the
    reference)."""
    options = {**OPTIONS, "kv_cache_dtype": kv_cache_dtype}
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": LONG_PROMPT}
    source, target = (LLM(model=tiny_models[case], show_progress=False, **options) for _ in range(2))
    source.generate([prompt], params, use_tqdm=False)
    (expected,) = source.generate([prompt], params, use_tqdm=False)  # from its own cached prefix
    assert expected.num_cached_tokens == 6 * 16
    assert layout(source.engine) == layout(target.engine)
    missing = missing_blocks(target.engine, LONG_PROMPT)
    assert missing == range(0, 6)
    data = export_blocks(source.engine, LONG_PROMPT, missing.start)
    assert import_blocks(target.engine, LONG_PROMPT, missing.start, data) == 6
    assert not missing_blocks(target.engine, LONG_PROMPT)
    (output,) = target.generate([prompt], params, use_tqdm=False)
    assert output.num_cached_tokens == 6 * 16
    assert output.outputs[0].token_ids == expected.outputs[0].token_ids
    assert target.engine.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize(("options", "message"), [
    ({"role": "both"}, "role must be 'prefill' or 'decode', got 'both'"),
    ({"role": "decode", "kv_transfer_address": "127.0.0.1"}, "kv_transfer_address must be HOST:PORT, got '127.0.0.1'"),
    ({"kv_transfer_address": "host:70000"}, "kv_transfer_address must be HOST:PORT, got 'host:70000'"),
])
def test_bad_role_options_are_refused_naming_the_field(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig(**options)


def test_what_cannot_move_its_blocks_is_refused(tiny_models):
    llm = LLM(model=tiny_models["llama-gqa"], show_progress=False, kv_cache_dtype="int4", enable_prefix_caching=False,
              **OPTIONS)
    with pytest.raises(ValueError, match=re.escape("prefill/decode disaggregation does not run with "
                                                   "kv_cache_dtype='int4', enable_prefix_caching off")):
        check_disaggregation(llm.engine)
