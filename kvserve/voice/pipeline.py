"""One voice turn as an asynchronous pipeline: transcript -> streamed answer -> sentences -> speech, each stage
feeding the next as soon as it has something, so the first sentence is heard while the model still writes.

    end of speech ─ASR─> transcript ─LLM─> deltas ─split─> sentence 1 ─TTS─> audio 1 ─> client
                                                     └──> sentence 2 ─TTS─> audio 2 ─> ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvserve.voice.asr import Transcriber
from kvserve.voice.sentences import SentenceSplitter, speakable
from kvserve.voice.tts import Synthesizer

SendEvent = Callable[[dict[str, Any]], Awaitable[None]]
SendAudio = Callable[[dict[str, Any], bytes], Awaitable[None]]  # an audio event and its WAV file
Answer = Callable[[str], AsyncIterator[str]]  # transcript -> the answer's text deltas


@dataclass
class TurnTimings:
    """When each stage delivered its first output, on the monotonic clock; reported in ms after the end of speech
    was detected. `silence_ms` is the endpointer's wait before that moment (the user had stopped talking)."""

    speech_end: float
    silence_ms: int = 0
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.monotonic())

    def report(self) -> dict[str, float | int]:
        stages = {stage: round((at - self.speech_end) * 1000, 1) for stage, at in self.marks.items()}
        return {"silence_ms": self.silence_ms, **stages}


class VoiceTurn:
    """Hear one utterance and answer it aloud, reporting each stage to the client as it happens.

    A speculative turn (`confirmed=False`) starts in a pause that may end the utterance: it transcribes, answers
    and speaks as usual, but holds every frame back until `confirm` (the pause was the end: the held frames go
    out at once, the rest as it comes) or until it is cancelled (the user spoke again). So the pause the
    endpointer must wait anyway hides the transcription, the first token and the first sentence's synthesis.
    """

    def __init__(self, transcriber: Transcriber, synthesizer: Synthesizer, send_event: SendEvent,
                 send_audio: SendAudio, voice: str | None = None, speed: float = 1.0, confirmed: bool = True) -> None:
        self.transcriber = transcriber
        self.synthesizer = synthesizer
        self.send_event = send_event
        self.send_audio = send_audio
        self.voice = voice
        self.speed = speed
        self.speculative = not confirmed
        self._held: list[tuple[dict[str, Any], bytes | None]] | None = None if confirmed else []
        self._confirmed = asyncio.Event()
        self._confirmed_at: float | None = None  # monotonic time of the end of speech, for a speculative turn
        self._timings = TurnTimings(0.0)
        if confirmed:
            self._confirmed.set()

    async def confirm(self, speech_end: float) -> None:
        """The end of speech is confirmed (at `speech_end`): deliver what was held back, in order, then stream."""
        self._confirmed_at = speech_end
        while self._held:
            await self._deliver(*self._held.pop(0))
        self._held = None
        self._confirmed.set()

    async def run(self, samples: np.ndarray, timings: TurnTimings, answer: Answer) -> dict[str, Any]:
        """Transcribe, answer and speak; the done event (also sent), with the stage timings."""
        self._timings = timings
        transcript = await asyncio.to_thread(self.transcriber.transcribe, samples)
        timings.mark("transcript")
        await self.emit({"type": "transcript", "text": transcript.text})
        text = ""
        if transcript.text:
            text = await self._answer_aloud(answer(transcript.text), timings)
        await self._confirmed.wait()
        if self._confirmed_at is not None:
            timings.speech_end = self._confirmed_at  # stages before it are negative: done during the pause
        timings.mark("done")
        done = {"type": "done", "transcript": transcript.text, "answer": text, "timings": timings.report(),
                "speculative": self.speculative}
        await self.emit(done)
        return done

    async def emit(self, event: dict[str, Any], audio: bytes | None = None) -> None:
        """Send a frame to the client, or hold it back while the turn is speculative."""
        if self._held is not None:
            self._held.append((event, audio))
        else:
            await self._deliver(event, audio)

    async def _deliver(self, event: dict[str, Any], audio: bytes | None) -> None:
        if audio is None:
            await self.send_event(event)
        else:
            await self.send_audio(event, audio)
            self._timings.mark("first_audio")  # when it went out, held back or not

    async def _answer_aloud(self, deltas: AsyncIterator[str], timings: TurnTimings) -> str:
        """Stream the answer's deltas to the client while its finished sentences are spoken in order."""
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(sentences))
        splitter, text = SentenceSplitter(), ""
        try:
            async for delta in deltas:
                timings.mark("first_token")
                text += delta
                await self.emit({"type": "delta", "content": delta})
                for sentence in splitter.feed(delta):
                    timings.mark("first_sentence")
                    sentences.put_nowait(sentence)
            for sentence in splitter.flush():
                timings.mark("first_sentence")
                sentences.put_nowait(sentence)
            sentences.put_nowait(None)
            await speaker
        finally:
            speaker.cancel()
        return text

    async def _speak(self, sentences: asyncio.Queue[str | None]) -> None:
        index = 0
        while (sentence := await sentences.get()) is not None:
            words = speakable(sentence)
            if not words:
                continue
            audio = await self.synthesizer.synthesize(words, self.voice, self.speed)
            await self.emit({"type": "audio", "index": index, "text": words, "bytes": len(audio)}, audio)
            index += 1
