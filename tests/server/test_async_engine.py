"""AsyncEngine on a model-free fake engine: delivery, aborts, errors, shutdown and the waiting count."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from serve_harness import FakeEngine

from kvserve.config import EngineConfig
from kvserve.engine import async_engine as async_engine_module
from kvserve.engine.async_engine import AsyncEngine, EngineDeadError, GenerateRequest
from kvserve.sampling_params import SamplingParams


@pytest.fixture()
def fake() -> Iterator[tuple[FakeEngine, AsyncEngine]]:
    engine = FakeEngine()
    async_engine = AsyncEngine(engine)  # type: ignore[arg-type]
    async_engine.start()
    yield engine, async_engine
    async_engine.shutdown()


def request(request_id: str, max_tokens: int = 3, prompt: list[int] | None = None) -> GenerateRequest:
    return GenerateRequest(request_id, {"prompt_token_ids": [1, 2] if prompt is None else prompt},
                           SamplingParams(max_tokens=max_tokens))


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until the engine thread has made `condition` true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def texts(async_engine: AsyncEngine, requests: list[GenerateRequest]) -> dict[str, str]:
    final = {}
    async for output in await async_engine.generate(requests):
        final[output.request_id] = output.outputs[0].text
    return final


def test_concurrent_requests_share_steps_and_finish(fake) -> None:
    engine, async_engine = fake

    async def main() -> list[dict[str, str]]:
        return await asyncio.gather(*(texts(async_engine, [request(f"r{i}", max_tokens=i + 1)]) for i in range(4)))

    results = asyncio.run(main())
    assert results == [{f"r{i}": "abcd"[:i + 1]} for i in range(4)]
    assert not engine.requests and engine.aborted == []


def test_group_of_requests_streams_until_all_finish(fake) -> None:
    _, async_engine = fake
    assert asyncio.run(texts(async_engine, [request("a", 2), request("b", 4)])) == {"a": "ab", "b": "abcd"}


def test_rejected_request_raises_value_error_and_adds_nothing(fake) -> None:
    engine, async_engine = fake
    with pytest.raises(ValueError, match="prompt must not be empty"):
        asyncio.run(texts(async_engine, [request("ok", 50), request("bad", prompt=[])]))
    assert engine.aborted == ["ok"]  # the group is all or nothing
    assert async_engine.num_waiting == 0


def test_leaving_early_aborts(fake) -> None:
    engine, async_engine = fake

    async def main() -> None:
        stream = await async_engine.generate([request("long", max_tokens=10_000)])
        async for _ in stream:
            break  # the consumer goes away after one output
        await eventually(lambda: engine.aborted == ["long"])

    asyncio.run(main())
    assert engine.aborted == ["long"] and not engine.requests


def test_cancelled_consumer_aborts(fake) -> None:
    engine, async_engine = fake

    async def main() -> None:
        task = asyncio.ensure_future(texts(async_engine, [request("long", max_tokens=10_000)]))
        await eventually(lambda: "long" in engine.requests)
        task.cancel()
        await eventually(lambda: engine.aborted == ["long"])

    asyncio.run(main())
    assert engine.aborted == ["long"]


def test_failing_step_fails_requests_in_flight_but_not_the_loop(fake) -> None:
    engine, async_engine = fake

    async def main() -> None:
        stream = await async_engine.generate([request("victim", max_tokens=10_000)])
        engine.raise_in_step = RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in stream:
                pass
        assert await texts(async_engine, [request("next", 2)]) == {"next": "ab"}

    asyncio.run(main())
    assert "victim" in engine.aborted and async_engine.is_running


def test_shutdown_fails_streams_and_refuses_new_requests() -> None:
    engine = FakeEngine()
    async_engine = AsyncEngine(engine)  # type: ignore[arg-type]
    async_engine.start()

    async def main() -> None:
        stream = await async_engine.generate([request("long", max_tokens=10_000)])
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await async_engine.generate([request("late")])

    asyncio.run(main())
    assert engine.aborted == ["long"]


def test_num_waiting_counts_the_engine_queue(fake) -> None:
    engine, async_engine = fake
    engine.num_waiting = 5

    async def main() -> None:
        await texts(async_engine, [request("a", 1)])  # any step publishes the engine's numbers
        await eventually(lambda: async_engine.num_waiting == 5)

    asyncio.run(main())
    assert async_engine.num_waiting == 5


class _ThreadRecordingEngine(FakeEngine):
    """Remembers the thread it was built on and the threads that stepped it."""

    def __init__(self, config: object) -> None:
        super().__init__()
        self.built_on = threading.current_thread()
        self.stepped_on: set[threading.Thread] = set()

    def step(self):  # type: ignore[no-untyped-def]
        self.stepped_on.add(threading.current_thread())
        return super().step()


def test_launch_builds_and_steps_the_engine_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # One OpenMP team: a model warmed up on the caller's thread and stepped on another runs every parallel region
    # with sleeping workers (the step took twice as long), so launch must load it on the thread that steps it.
    monkeypatch.setattr(async_engine_module, "Engine", _ThreadRecordingEngine)
    async_engine = AsyncEngine.launch(EngineConfig.from_kwargs())
    try:
        engine = async_engine.engine
        assert asyncio.run(texts(async_engine, [request("a")])) == {"a": "abc"}
        assert engine.built_on is not threading.current_thread()
        assert engine.stepped_on == {engine.built_on}
    finally:
        async_engine.shutdown()
    assert not async_engine.is_running


def test_launch_raises_what_loading_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(config: object) -> None:
        raise ValueError("no such model")

    monkeypatch.setattr(async_engine_module, "Engine", fail)
    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.launch(EngineConfig.from_kwargs())
