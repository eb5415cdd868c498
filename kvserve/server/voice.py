"""Voice mode on the server: what it runs on (or why it is off), its status at GET /v1/voice, and the streaming
voice socket at /v1/voice/ws (the page's microphone button).

The socket's protocol:
- The client sends `{"type": "start", ...}` to listen for one utterance. Its other fields are the chat request
  of the answer (as POSTed to /v1/chat/completions; `messages` is the conversation before the utterance, and
  the transcript is appended as the user's message; `stream` is implied), plus `voice`, `speed` (0.25-4),
  `silence_ms` (100-3000: how long a pause ends the utterance) and `speculate` (default true: begin the answer
  in the pause, see below). A start while an answer is under way stops that
  answer first (barge-in).
- Then binary frames: 16 kHz mono 16-bit little-endian PCM, any length. Silero VAD ends the utterance after
  `silence_ms` of silence that follows speech; `{"type": "end"}` ends it at once (push to talk), and 30 s of
  audio end it too. Frames while not listening are dropped. The answer begins speculatively ~100 ms into a pause
  and is held back; if the pause ends the utterance its frames go out at once, if speech resumes it is dropped.
- The server answers with text frames: `listening`, `speech_start`, `speech_end`, `transcript` {text}, `delta`
  {content} as the answer streams, `audio` {index, text, bytes} each followed by one binary frame (a WAV file of
  that sentence), and `done` {transcript, answer, timings, speculative}: ms after the end of speech was
  detected to the transcript, the first token, the first sentence (negative: during the pause) and the first
  audio sent. `{"type": "cancel"}` stops listening or answering.
- Errors are `{"type": "error", "error": {...}, "status_code": N}` frames, as the HTTP API's bodies; the socket
  stays usable. With an API key the upgrade needs it (server/auth.py). Closing the socket aborts the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from kvserve.server.errors import OpenAIError, internal_error, invalid_request, validation_error
from kvserve.server.protocol import ChatCompletionRequest
from kvserve.voice.asr import ASR_MODEL, MAX_SECONDS, shared_transcriber
from kvserve.voice.audio import SAMPLE_RATE, pcm16_samples
from kvserve.voice.availability import voice_unavailable
from kvserve.voice.pipeline import TurnTimings, VoiceTurn
from kvserve.voice.tts import SYNTHESIZERS, check_voice

logger = logging.getLogger(__name__)

router = APIRouter()
ChatJob = Callable[[Any, ChatCompletionRequest], Awaitable[Any]]  # api_server.chat_job
_VOICE_FIELDS = ("voice", "speed", "silence_ms", "speculate")
PAUSE_FRAMES = 3  # VAD frames (32 ms) of silence after speech that begin a speculative answer


class VoiceService:
    """Speech recognition and synthesis for one app; `unavailable` says why voice mode is off (None: on)."""

    def __init__(self, tts: str, chat_job: ChatJob) -> None:
        self.unavailable = voice_unavailable(tts)
        if self.unavailable:
            logger.info(self.unavailable)
        self.synthesizer = SYNTHESIZERS[tts]()
        self.transcriber = shared_transcriber()
        self.chat_job = chat_job

    def warm_up(self) -> None:
        """Load Whisper and the voice and run them once (in a worker thread, while the user talks)."""
        self.transcriber.warm_up()
        self.synthesizer.warm_up()

    def check(self) -> None:
        """503 naming what is missing when voice mode is off."""
        if self.unavailable:
            raise OpenAIError(503, self.unavailable, type="server_error", code="voice_unavailable")


def install_voice(app: FastAPI, tts: str, chat_job: ChatJob) -> None:
    app.state.voice = VoiceService(tts, chat_job)
    app.include_router(router)


@router.get("/v1/voice")
async def status(request: Request) -> dict[str, Any]:
    """Whether voice mode is on, and on what: the page shows its microphone button only when it is."""
    voice: VoiceService = request.app.state.voice
    return {"available": voice.unavailable is None, "reason": voice.unavailable, "asr_model": ASR_MODEL,
            "tts": voice.synthesizer.name, "sample_rate": SAMPLE_RATE}


@router.websocket("/v1/voice/ws")
async def voice_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    session = VoiceSession(websocket)
    try:
        await session.serve()
    except WebSocketDisconnect:
        pass
    finally:
        await session.stop_turn()


class VoiceSession:
    """One client's socket: listens for an utterance when asked, then answers it aloud as a background task, so
    that the socket keeps reading (a cancel, a barge-in, or the client leaving stops the answer)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.server = websocket.app.state.server
        self.voice: VoiceService = websocket.app.state.voice
        self.send_lock = asyncio.Lock()  # an audio event and its binary frame go out together
        self.listening: _Utterance | None = None
        self.turn: _Answering | None = None  # the answer under way
        self.speculation: _Answering | None = None  # an answer begun in a pause, held back until it is the end

    async def serve(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                if message.get("bytes") is not None:
                    await self.on_audio(message["bytes"])
                else:
                    await self.on_command(message.get("text") or "")
            except OpenAIError as error:
                await self.send_error(error)

    async def on_command(self, text: str) -> None:
        try:
            command = json.loads(text)
        except json.JSONDecodeError:
            raise OpenAIError(400, "a text frame must be a JSON object", param="type") from None
        kind = command.get("type") if isinstance(command, dict) else None
        if kind == "start":
            self.voice.check()
            utterance = _Utterance(self.parse_start(command))
            await self.stop_turn()
            self.listening = utterance
            await self.send({"type": "listening"})
            asyncio.get_running_loop().run_in_executor(None, self.voice.warm_up)
        elif kind == "end":
            if self.listening is not None:
                await self.end_utterance()
        elif kind == "cancel":
            self.listening = None
            await self.stop_turn()
        else:
            raise OpenAIError(400, f"type must be 'start', 'end' or 'cancel', got {kind!r}", param="type")

    def parse_start(self, command: dict[str, Any]) -> dict[str, Any]:
        """The turn's options, checked now so that a mistake is reported before the user speaks."""
        chat = {key: value for key, value in command.items() if key not in ("type", *_VOICE_FIELDS)}
        if not isinstance(chat.setdefault("messages", []), list):
            raise OpenAIError(400, "messages must be a list: the conversation before the utterance", param="messages")
        try:
            ChatCompletionRequest.model_validate({**chat, "messages": [*chat["messages"], _user("check")],
                                                  "stream": True}).sampling_params()
        except ValidationError as error:
            raise validation_error(error.errors()) from None
        except ValueError as error:
            raise invalid_request(error) from None
        self.server.check_model(chat.get("model"))
        options = {"chat": chat, "speed": command.get("speed", 1.0), "silence_ms": command.get("silence_ms", 500)}
        try:
            options["voice"] = check_voice(self.voice.synthesizer, command.get("voice"))
        except ValueError as error:
            raise invalid_request(error) from None
        for name, low, high in (("speed", 0.25, 4.0), ("silence_ms", 100, 3000)):
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise OpenAIError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", param=name)
        options["speculate"] = command.get("speculate", True)
        if not isinstance(options["speculate"], bool):
            raise OpenAIError(400, f"speculate must be true or false, got {options['speculate']!r}", param="speculate")
        return options

    async def on_audio(self, data: bytes) -> None:
        utterance = self.listening
        if utterance is None:
            return  # the microphone's tail after the end of an utterance
        try:
            samples = pcm16_samples(data)
        except ValueError as error:
            raise OpenAIError(400, f"audio frame: {error}", param="audio") from None
        was_speaking = utterance.detector.speech_started
        ended = utterance.add(samples)
        if utterance.detector.speech_started and not was_speaking:
            await self.send({"type": "speech_start"})
        if ended:
            await self.end_utterance()
        else:
            self.speculate(utterance)

    def speculate(self, utterance: _Utterance) -> None:
        """In a pause after speech, begin answering what was heard, held back; speech again cancels it."""
        detector, speculation = utterance.detector, self.speculation
        if not utterance.options["speculate"]:
            return
        if speculation is not None and speculation.speech_frames != detector.speech_frames:
            speculation.task.cancel()  # the user went on talking: aborts its request, frees its blocks
            self.speculation = speculation = None
        if speculation is None and detector.speech_started and detector.trailing_silence >= PAUSE_FRAMES:
            self.speculation = self.start_answer(utterance, TurnTimings(0.0), confirmed=False)

    async def end_utterance(self) -> None:
        """Stop listening; answer what was heard in the background, or let the speculative answer of this very
        speech through."""
        utterance, self.listening = self.listening, None
        now = time.monotonic()
        await self.send({"type": "speech_end", "seconds": round(utterance.seconds, 2)})
        speculation, self.speculation = self.speculation, None
        silence_ms = utterance.silence_ms if utterance.detector.ended else 0
        if speculation is not None and speculation.speech_frames == utterance.detector.speech_frames:
            self.turn = speculation
            speculation.timings.silence_ms = silence_ms
            await speculation.turn.confirm(now)
            return
        if speculation is not None:
            speculation.task.cancel()
        self.turn = self.start_answer(utterance, TurnTimings(now, silence_ms), confirmed=True)

    def start_answer(self, utterance: _Utterance, timings: TurnTimings, confirmed: bool) -> _Answering:
        options = utterance.options
        turn = VoiceTurn(self.voice.transcriber, self.voice.synthesizer, self.send, self.send_audio,
                         options["voice"], options["speed"], confirmed=confirmed)
        task = asyncio.create_task(self.answer(turn, utterance.samples(), timings, options["chat"]))
        return _Answering(turn, task, timings, utterance.detector.speech_frames)

    async def answer(self, turn: VoiceTurn, samples: np.ndarray, timings: TurnTimings, chat: dict[str, Any]) -> None:
        try:
            done = await turn.run(samples, timings, lambda text: self.deltas(chat, text))
            logger.info("voice turn (%s): %.1f s of audio, ms after the end of speech %s",
                        "speculative" if turn.speculative else "after the pause", len(samples) / SAMPLE_RATE,
                        done["timings"])
        except OpenAIError as error:
            await turn.emit(_error_event(error))
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception as error:
            logger.error("voice turn failed", exc_info=error)
            await turn.emit(_error_event(internal_error(f"internal error: {type(error).__name__}")))

    async def deltas(self, chat: dict[str, Any], transcript: str) -> AsyncIterator[str]:
        """The answer's text deltas, from the same chat path as /v1/chat/completions."""
        body = ChatCompletionRequest.model_validate({**chat, "messages": [*chat["messages"], _user(transcript)],
                                                     "stream": True})
        job = await self.voice.chat_job(self.server, body)
        outputs = await self.server.open(job)
        chunks = job.formatter.chunks(outputs, job.num_choices)
        try:
            async for chunk in chunks:
                for choice in getattr(chunk, "choices", None) or []:
                    if choice.delta.content:
                        yield choice.delta.content
        finally:
            await chunks.aclose()
            outputs.abort()  # a no-op once finished; frees the blocks of an answer cut short

    async def stop_turn(self) -> None:
        """Cancel the answer under way and the speculative one, and wait for them to let go of their requests."""
        tasks = [answering.task for answering in (self.turn, self.speculation) if answering is not None]
        self.turn = self.speculation = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def send(self, event: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.websocket.send_text(json.dumps(event))

    async def send_audio(self, event: dict[str, Any], audio: bytes) -> None:
        async with self.send_lock:
            await self.websocket.send_text(json.dumps(event))
            await self.websocket.send_bytes(audio)

    async def send_error(self, error: OpenAIError) -> None:
        await self.send(_error_event(error))


def _error_event(error: OpenAIError) -> dict[str, Any]:
    return {"type": "error", "error": error.info.model_dump(), "status_code": error.status_code}


@dataclass
class _Answering:
    """An answer's turn and task, and how much speech it answers."""

    turn: VoiceTurn
    task: asyncio.Task
    timings: TurnTimings
    speech_frames: int  # VAD frames of speech heard when it began


class _Utterance:
    """The audio of one utterance as it arrives, and the endpointer listening to it."""

    def __init__(self, options: dict[str, Any]) -> None:
        from kvserve.voice.endpointing import EndOfSpeech

        self.options = options
        self.silence_ms = int(options["silence_ms"])
        self.detector = EndOfSpeech(silence_ms=self.silence_ms)
        self.chunks: list[np.ndarray] = []
        self.num_samples = 0

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE

    def add(self, samples: np.ndarray) -> bool:
        """Keep (n,) samples; True when the utterance has ended (a pause after speech, or MAX_SECONDS)."""
        samples = samples[: max(0, int(MAX_SECONDS * SAMPLE_RATE) - self.num_samples)]
        self.chunks.append(samples)
        self.num_samples += len(samples)
        return self.detector.feed(samples) or self.seconds >= MAX_SECONDS

    def samples(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}
