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
    """Hear one utterance and answer it aloud, reporting each stage to the client as it happens."""

    def __init__(self, transcriber: Transcriber, synthesizer: Synthesizer, send_event: SendEvent,
                 send_audio: SendAudio, voice: str | None = None, speed: float = 1.0) -> None:
        self.transcriber = transcriber
        self.synthesizer = synthesizer
        self.send_event = send_event
        self.send_audio = send_audio
        self.voice = voice
        self.speed = speed

    async def run(self, samples: np.ndarray, timings: TurnTimings, answer: Answer) -> dict[str, Any]:
        """Transcribe, answer and speak; the done event (also sent), with the stage timings."""
        transcript = await asyncio.to_thread(self.transcriber.transcribe, samples)
        timings.mark("transcript")
        await self.send_event({"type": "transcript", "text": transcript.text})
        text = ""
        if transcript.text:
            text = await self._answer_aloud(answer(transcript.text), timings)
        timings.mark("done")
        done = {"type": "done", "transcript": transcript.text, "answer": text, "timings": timings.report()}
        await self.send_event(done)
        return done

    async def _answer_aloud(self, deltas: AsyncIterator[str], timings: TurnTimings) -> str:
        """Stream the answer's deltas to the client while its finished sentences are spoken in order."""
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(sentences, timings))
        splitter, text = SentenceSplitter(), ""
        try:
            async for delta in deltas:
                timings.mark("first_token")
                text += delta
                await self.send_event({"type": "delta", "content": delta})
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

    async def _speak(self, sentences: asyncio.Queue[str | None], timings: TurnTimings) -> None:
        index = 0
        while (sentence := await sentences.get()) is not None:
            words = speakable(sentence)
            if not words:
                continue
            audio = await self.synthesizer.synthesize(words, self.voice, self.speed)
            await self.send_audio({"type": "audio", "index": index, "text": words, "bytes": len(audio)}, audio)
            timings.mark("first_audio")
            index += 1
