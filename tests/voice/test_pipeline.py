"""VoiceTurn with a fake transcriber, synthesizer and model: event order, what is spoken and when, the timings, an
empty transcript, and an answer that fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from kvserve.voice.asr import Transcript
from kvserve.voice.pipeline import TurnTimings, VoiceTurn
from kvserve.voice.sentences import speakable

QUESTION = "What is the capital of France?"
DELTAS = ["**Paris** is the capital. ", "It is big. ", "Very big"]
STAGES = ["transcript", "first_token", "first_sentence", "first_audio", "done"]
PATIENCE_S = 5.0  # how long a fake waits for the pipeline before failing the test (never reached when it works)


class FakeTranscriber:
    def __init__(self, text: str = QUESTION) -> None:
        self.text = text

    def transcribe(self, samples: np.ndarray) -> Transcript:
        return Transcript(self.text, len(samples) / 16_000, [])


class FakeSynthesizer:
    """Says "WAV:" and the text; records each call. `hold_from` (a call number) makes that call and later ones wait
    for `release`, and records whether they were cancelled."""

    name = "fake"
    default_voice = "plain"

    def __init__(self, hold_from: int | None = None) -> None:
        self.calls: list[tuple[str, str | None, float]] = []
        self.hold_from = hold_from
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.outcomes: list[str] = []
        self.settled = asyncio.Event()

    def voices(self) -> list[str]:
        return [self.default_voice]

    async def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0) -> bytes:
        self.calls.append((text, voice, speed))
        if self.hold_from is not None and len(self.calls) >= self.hold_from:
            self.holding.set()
            try:
                await self.release.wait()
                self.outcomes.append("finished")
            except asyncio.CancelledError:
                self.outcomes.append("cancelled")
                raise
            finally:
                self.settled.set()
        return f"WAV:{text}".encode()


class Recorder:
    """The send callbacks: every event in order (audio events with their bytes), and a flag for the first audio."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.audio: list[bytes] = []
        self.first_audio = asyncio.Event()

    async def send_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def send_audio(self, event: dict[str, Any], audio: bytes) -> None:
        self.events.append(event)
        self.audio.append(audio)
        self.first_audio.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]

    def position(self, kind: str, **fields: Any) -> int:
        return next(i for i, event in enumerate(self.events)
                    if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()))


class ScriptedAnswer:
    """A model answer that yields all its deltas but the last, waits for `before_last` (at most PATIENCE_S: else
    TimeoutError, the pipeline did not get there in time), then yields the last; records the questions asked."""

    def __init__(self, before_last: asyncio.Event, deltas: list[str] = DELTAS) -> None:
        self.before_last = before_last
        self.deltas = deltas
        self.questions: list[str] = []

    async def __call__(self, question: str) -> AsyncIterator[str]:
        self.questions.append(question)
        for delta in self.deltas[:-1]:
            yield delta
            await asyncio.sleep(0)
        await asyncio.wait_for(self.before_last.wait(), PATIENCE_S)
        yield self.deltas[-1]


def run_turn(recorder: Recorder, synthesizer: FakeSynthesizer, answer: ScriptedAnswer,
             transcriber: FakeTranscriber | None = None) -> dict[str, Any]:
    turn = VoiceTurn(transcriber or FakeTranscriber(), synthesizer, recorder.send_event, recorder.send_audio,
                     voice="plain", speed=1.5)
    timings = TurnTimings(speech_end=time.monotonic(), silence_ms=500)
    return asyncio.run(turn.run(np.zeros(16_000, np.float32), timings, answer))


def test_events_come_in_order() -> None:
    recorder = Recorder()
    answer = ScriptedAnswer(recorder.first_audio)
    done = run_turn(recorder, FakeSynthesizer(), answer)
    assert answer.questions == [QUESTION]
    kinds = [event["type"] for event in recorder.events]
    assert kinds[0] == "transcript" and recorder.events[0]["text"] == QUESTION
    assert kinds[-1] == "done" and recorder.events[-1] == done
    assert [event["content"] for event in recorder.of_type("delta")] == DELTAS
    assert [event["index"] for event in recorder.of_type("audio")] == [0, 1, 2]
    assert kinds.count("transcript") == kinds.count("done") == 1


def test_the_sentences_are_spoken_in_order_through_speakable() -> None:
    recorder, synthesizer = Recorder(), FakeSynthesizer()
    run_turn(recorder, synthesizer, ScriptedAnswer(recorder.first_audio))
    spoken = ["Paris is the capital.", "It is big.", "Very big"]
    assert spoken[0] == speakable("**Paris** is the capital.")
    assert synthesizer.calls == [(text, "plain", 1.5) for text in spoken]
    assert [event["text"] for event in recorder.of_type("audio")] == spoken
    assert recorder.audio == [f"WAV:{text}".encode() for text in spoken]
    assert [event["bytes"] for event in recorder.of_type("audio")] == [len(audio) for audio in recorder.audio]


def test_the_first_audio_is_sent_before_the_answer_ends() -> None:
    recorder = Recorder()
    run_turn(recorder, FakeSynthesizer(), ScriptedAnswer(recorder.first_audio))  # else TimeoutError
    assert recorder.position("audio", index=0) < recorder.position("delta", content=DELTAS[-1])


def test_a_piece_with_nothing_to_say_is_skipped_without_taking_an_index() -> None:
    recorder, synthesizer = Recorder(), FakeSynthesizer()
    deltas = ["## \n", "Paris is the capital. ", "Done."]
    run_turn(recorder, synthesizer, ScriptedAnswer(recorder.first_audio, deltas))
    assert [(event["index"], event["text"]) for event in recorder.of_type("audio")] == [
        (0, "Paris is the capital."), (1, "Done.")]
    assert [text for text, _, _ in synthesizer.calls] == ["Paris is the capital.", "Done."]


def test_the_done_event_has_the_transcript_answer_and_ordered_timings() -> None:
    recorder = Recorder()
    done = run_turn(recorder, FakeSynthesizer(), ScriptedAnswer(recorder.first_audio))
    assert done["transcript"] == QUESTION
    assert done["answer"] == "".join(DELTAS)
    timings = done["timings"]
    assert timings["silence_ms"] == 500
    assert list(timings) == ["silence_ms", *STAGES]
    stage_ms = [timings[stage] for stage in STAGES]
    assert stage_ms == sorted(stage_ms) and stage_ms[0] >= 0


def test_an_empty_transcript_is_not_answered() -> None:
    recorder, synthesizer = Recorder(), FakeSynthesizer()
    answer = ScriptedAnswer(recorder.first_audio)
    done = run_turn(recorder, synthesizer, answer, FakeTranscriber(""))
    assert answer.questions == []
    assert [event["type"] for event in recorder.events] == ["transcript", "done"]
    assert synthesizer.calls == [] and recorder.audio == []
    assert done["answer"] == "" and list(done["timings"]) == ["silence_ms", "transcript", "done"]


def test_a_failing_answer_propagates_and_cancels_the_speaker() -> None:
    async def scenario() -> tuple[Recorder, FakeSynthesizer]:
        recorder, synthesizer = Recorder(), FakeSynthesizer(hold_from=2)

        async def failing_answer(question: str) -> AsyncIterator[str]:
            yield "First sentence. Second sentence. "
            await asyncio.wait_for(synthesizer.holding.wait(), PATIENCE_S)  # the second is being synthesized
            raise RuntimeError("the model failed")

        turn = VoiceTurn(FakeTranscriber(), synthesizer, recorder.send_event, recorder.send_audio)
        with pytest.raises(RuntimeError, match="the model failed"):
            await turn.run(np.zeros(1600, np.float32), TurnTimings(time.monotonic()), failing_answer)
        synthesizer.release.set()  # a speaker still running would now finish the second sentence and send it
        await asyncio.wait_for(synthesizer.settled.wait(), PATIENCE_S)
        for _ in range(3):
            await asyncio.sleep(0)
        return recorder, synthesizer

    recorder, synthesizer = asyncio.run(scenario())
    assert synthesizer.outcomes == ["cancelled"]
    assert [event["text"] for event in recorder.of_type("audio")] == ["First sentence."]
    assert recorder.of_type("done") == []


async def _speculative_turn(recorder: Recorder) -> tuple[VoiceTurn, asyncio.Task, TurnTimings]:
    """A speculative turn run until its whole answer is done and held back."""
    turn = VoiceTurn(FakeTranscriber(), FakeSynthesizer(), recorder.send_event, recorder.send_audio,
                     confirmed=False)
    done = asyncio.Event()
    done.set()
    timings = TurnTimings(0.0, silence_ms=500)
    task = asyncio.create_task(turn.run(np.zeros(1600, np.float32), timings, ScriptedAnswer(done)))
    for _ in range(200):  # until the last audio is held: the turn waits for its confirmation
        await asyncio.sleep(0.001)
        if turn._held and turn._held[-1][0]["type"] == "audio" and turn._held[-1][0]["text"] == "Very big":
            break
    return turn, task, timings


def test_a_speculative_turn_holds_everything_back_until_confirmed() -> None:
    async def scenario() -> tuple[list[dict], dict[str, Any], float]:
        recorder = Recorder()
        turn, task, timings = await _speculative_turn(recorder)
        assert recorder.events == [] and not task.done()  # nothing out, and done waits for the confirmation
        confirmed_at = time.monotonic()
        await turn.confirm(confirmed_at)
        return recorder.events, await asyncio.wait_for(task, PATIENCE_S), confirmed_at

    events, done, confirmed_at = asyncio.run(scenario())
    kinds = [event["type"] for event in events]
    assert kinds[0] == "transcript" and kinds[-1] == "done" and kinds.count("audio") == 3
    assert done["speculative"] and events[-1] == done
    timings = done["timings"]
    assert timings["transcript"] < 0 and timings["first_sentence"] < 0  # done before the end was confirmed
    assert 0 <= timings["first_audio"] <= timings["done"]  # sent after it


def test_a_cancelled_speculative_turn_sends_nothing() -> None:
    async def scenario() -> Recorder:
        recorder = Recorder()
        _, task, _ = await _speculative_turn(recorder)
        task.cancel()
        await asyncio.wait({task})
        return recorder

    assert asyncio.run(scenario()).events == []
