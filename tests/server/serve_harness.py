"""Test helpers: uvicorn in a background thread, a model-free fake engine, metric scraping."""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from kvserve.config import EngineConfig
from kvserve.engine.engine import EngineStats
from kvserve.engine.scheduler import SpecDecodeStats
from kvserve.inputs import InputProcessor
from kvserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams

# The live server fixture's settings (conftest.py), shared with the tests.
MODEL = "smollm2"
API_KEY = "test-key-0123456789"
GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "请用中文介绍一下长城。"]
GREEDY_MAX_TOKENS = 12
CHAT_MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


class ThreadedServer:
    """A real uvicorn server on a free 127.0.0.1 port, run in a daemon thread."""

    def __init__(self, app: Any, make_server: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server) -> None:
        # Bind first and hand the socket over: no race for the port between choosing and binding.
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = make_server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


_SAMPLE = re.compile(r"^(kvserve:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+|NaN|[+-]Inf)$")


def scrape(url: str) -> dict[str, float]:
    """GET /metrics as {'name{labels}': value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def wait_for_idle(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and no KV block is in use; returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        idle = (samples["kvserve:num_requests_running"] == 0 and samples["kvserve:num_requests_waiting"] == 0
                and samples["kvserve:kv_cache_usage_ratio"] == 0)
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI-shaped error with this status (and param); returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@dataclass
class _FakeRequest:
    params: SamplingParams
    arrival: float
    num_produced: int = 0
    token_ids: list[int] = field(default_factory=list)


class FakeTokenizer:
    """A model-free tokenizer: one token per UTF-8 byte, and a chat template of role tags."""

    chat_template = "fake"
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int]) -> str:
        return bytes(token_ids).decode(errors="replace")

    def convert_ids_to_tokens(self, token_ids: int | list[int]) -> str | list[str]:
        """As Hugging Face's: one id gives one string, a list (maybe empty) a list."""
        if isinstance(token_ids, list):
            return [self.decode([token_id % 256]) for token_id in token_ids]
        return self.decode([token_ids % 256])

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeEngine:
    """A model-free Engine stand-in: every request yields tokens 0, 1, 2, ... ('a', 'b', ...), one per step.

    The first `max_num_seqs` sequences (a request counts `n`) run, in arrival order; the rest wait.
    """

    def __init__(self, step_s: float = 0.01, max_num_seqs: int = 64, strict: bool = False) -> None:
        """`strict`: a FakeTokenizer, and prompts and lengths validated like the real engine's (InputProcessor)."""
        self.step_s = step_s
        self.strict = strict
        self.requests: dict[str, _FakeRequest] = {}
        self.prompts: dict[str, list[int]] = {}
        self.aborted: list[str] = []
        self.tokenizer = FakeTokenizer() if strict else None
        self.max_model_len = 64
        self.config = EngineConfig.from_kwargs(max_num_seqs=max_num_seqs)  # the bundled model (model=None)
        self.is_paused = False  # while True, steps produce nothing: requests stay where they are
        self.peak_num_waiting = 0  # the most sequences ever waiting, seen right after an add
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=1000, max_model_len=self.max_model_len)
        self.num_waiting = 0  # what stats() reports: lets a test fill the waiting queue
        self.raise_in_step: Exception | None = None
        self.num_to_fail = 0  # the next requests added fail (their first output carries an error)
        self._failing: set[str] = set()

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        ids = list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.strict:  # as Engine.add_request: ids in the vocabulary, the length rules, max_tokens resolved
            params = dataclasses.replace(params, max_tokens=self.input_processor.process(prompt, params).max_tokens)
        self.prompts[request_id] = ids
        if self.num_to_fail > 0:
            self.num_to_fail -= 1
            self._failing.add(request_id)
        self.requests[request_id] = _FakeRequest(params, arrival_time or time.monotonic())
        self.peak_num_waiting = max(self.peak_num_waiting, self._num_seqs(waiting=True))

    def _running_ids(self) -> list[str]:
        running, num_seqs = [], 0
        for request_id, request in self.requests.items():
            if num_seqs + request.params.n > self.config.scheduler.max_num_seqs:
                break
            running.append(request_id)
            num_seqs += request.params.n
        return running

    def _num_seqs(self, waiting: bool) -> int:
        running = set(self._running_ids())
        return sum(r.params.n for i, r in self.requests.items() if (i in running) != waiting)

    def abort_request(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def check_health(self) -> None:
        """No workers to lose."""

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        if self.raise_in_step is not None:
            error, self.raise_in_step = self.raise_in_step, None
            raise error
        if self.is_paused:
            return []
        return [self._advance(request_id) for request_id in self._running_ids()]

    def _advance(self, request_id: str) -> RequestOutput:
        request = self.requests[request_id]
        token = request.num_produced
        request.num_produced += 1
        request.token_ids.append(token)
        done = request.num_produced >= (request.params.max_tokens or 4)
        failed = request_id in self._failing
        reason = "error" if failed else ("length" if done else None)
        if reason is not None:
            del self.requests[request_id]
        now = time.monotonic()
        metrics = RequestMetrics(arrival_time=request.arrival, first_scheduled_time=request.arrival,
                                 first_token_time=now, last_token_time=now,
                                 finished_time=now if reason else None,
                                 num_prompt_tokens=len(self.prompts[request_id]),
                                 num_generation_tokens=request.num_produced)
        text = "".join(chr(ord("a") + t % 26) for t in request.token_ids)
        logprobs = None
        if request.params.logprobs is not None:  # the token, and one less likely alternative
            logprobs = [{t: -0.5, (t + 1) % 1000: -1.5} for t in request.token_ids]
        completion = CompletionOutput(0, text, list(request.token_ids), reason, None, logprobs,
                                      delta_text=text[-1], delta_token_ids=[token])
        return RequestOutput(request_id, None, self.prompts[request_id], [completion], reason is not None,
                             metrics, error="RuntimeError: injected" if failed else None)

    def kv_snapshot(self) -> dict[str, Any]:
        """The real snapshot's shape: one block per request, no cached blocks."""
        requests = [{"id": request_id, "status": "running", "num_prompt_tokens": 1, "num_output_tokens": 0,
                     "num_computed_tokens": 1, "num_cached_tokens": 0, "num_preemptions": 0,
                     "block_table": [index], "residual_block": None}
                    for index, request_id in enumerate(self.requests)]
        return {"time": time.time(), "num_blocks": 8, "block_size": 16, "kv_cache_dtype": "float32",
                "num_kv_groups": 1, "kv_window": None, "ref_counts": [int(i < len(requests)) for i in range(8)],
                "cached_blocks": [], "requests": requests, "stats": dataclasses.asdict(self.stats())}

    def kv_memory(self, context: int, batch: int) -> dict[str, Any]:
        return {"context": context, "batch": batch, "attention": []}

    def stats(self) -> EngineStats:
        # Zero for every field, so that the fake keeps up as EngineStats grows.
        zeros = {f.name: 0 for f in dataclasses.fields(EngineStats)}
        return EngineStats(**{**zeros, "spec_decode": SpecDecodeStats(), "num_running": self._num_seqs(waiting=False),
                              "num_waiting": self._num_seqs(waiting=True) + self.num_waiting,
                              "kv_blocks_used": len(self.requests), "kv_blocks_total": 8,
                              "kv_cache_usage": len(self.requests) / 8})
