"""OpenAI's audio endpoints on voice mode's models: POST /v1/audio/transcriptions (Whisper tiny.en) and
POST /v1/audio/speech (espeak-ng or Piper). Both answer 503 naming what is missing when voice mode is off."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from kvserve.server.errors import OpenAIError, invalid_request
from kvserve.server.voice import VoiceService
from kvserve.voice.asr import ASR_MODEL_ALIASES, Transcript
from kvserve.voice.audio import decode_audio, wav_pcm
from kvserve.voice.tts import check_voice

router = APIRouter()
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TTS_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # OpenAI's names, for its clients
MAX_SPEECH_INPUT = 4096  # characters, as OpenAI's limit


class Transcription(BaseModel):
    text: str


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="espeak-ng or piper (the server's --tts), or an OpenAI TTS model name")
    input: str = Field(min_length=1, max_length=MAX_SPEECH_INPUT)
    voice: str | None = Field(None, description="an espeak-ng language code (e.g. en-us), or an OpenAI voice "
                                                "name, which is the engine's default voice")
    response_format: Literal["wav", "pcm"] = Field("wav", description="pcm: raw 16-bit mono samples at the "
                                                                      "voice's rate (X-Sample-Rate header)")
    speed: float = Field(1.0, ge=0.25, le=4.0)


def _voice(request: Request) -> VoiceService:
    voice: VoiceService = request.app.state.voice
    voice.check()
    return voice


@router.post("/v1/audio/transcriptions", response_model=None,
             responses={200: {"model": Transcription, "content": {"text/plain": {}},
                              "description": "The transcript: JSON, or text / SRT / WebVTT per response_format"}})
async def transcriptions(request: Request, file: Annotated[UploadFile, File(description="audio in any format "
                                                                                         "FFmpeg reads")],
                         model: Annotated[str, Form()], language: Annotated[str | None, Form()] = None,
                         prompt: Annotated[str | None, Form(max_length=1000)] = None,
                         response_format: Annotated[str, Form()] = "json",
                         temperature: Annotated[float, Form(ge=0, le=1)] = 0.0) -> Response:
    """Speech to text with Whisper tiny.en (English only)."""
    voice = _voice(request)
    if model not in ASR_MODEL_ALIASES:
        raise OpenAIError(404, f"model {model!r} does not exist; transcription serves {ASR_MODEL_ALIASES[0]!r}",
                          param="model", code="model_not_found")
    if language not in (None, "", "en", "english"):
        raise OpenAIError(400, f"language must be 'en': {ASR_MODEL_ALIASES[0]} transcribes English only, "
                               f"got {language!r}", param="language")
    if response_format not in TRANSCRIPT_FORMATS:
        raise OpenAIError(400, f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}, got "
                               f"{response_format!r}", param="response_format")
    try:
        samples = await asyncio.to_thread(decode_audio, await file.read())
    except ValueError as error:
        raise OpenAIError(400, f"file: {error}", param="file") from None
    transcript = await asyncio.to_thread(voice.transcriber.transcribe, samples, prompt, temperature)
    return _transcript_response(transcript, response_format)


def _transcript_response(transcript: Transcript, response_format: str) -> Response:
    if response_format == "json":
        return JSONResponse({"text": transcript.text})
    if response_format == "verbose_json":
        segments = [{"id": i, **segment} for i, segment in enumerate(transcript.segments)]
        return JSONResponse({"task": "transcribe", "language": "english", "duration": transcript.duration_s,
                             "text": transcript.text, "segments": segments})
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    return PlainTextResponse(_subtitles(transcript, vtt=response_format == "vtt"))


def _subtitles(transcript: Transcript, vtt: bool) -> str:
    """SubRip or WebVTT cues, one per segment."""
    def stamp(seconds: float) -> str:
        millis = round(seconds * 1000)
        hours, millis = divmod(millis, 3_600_000)
        minutes, millis = divmod(millis, 60_000)
        return f"{hours:02}:{minutes:02}:{millis // 1000:02}{'.' if vtt else ','}{millis % 1000:03}"

    cues = [f"{stamp(s['start'])} --> {stamp(s['end'])}\n{s['text']}\n" for s in transcript.segments]
    if vtt:
        return "WEBVTT\n\n" + "\n".join(cues)
    return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, start=1))


@router.post("/v1/audio/speech", response_model=None,
             responses={200: {"content": {"audio/wav": {}, "audio/pcm": {}}, "description": "The speech"}})
async def speech(body: SpeechRequest, request: Request) -> Response:
    """Text to speech with the server's engine (--tts): one WAV file (or raw PCM) of the whole input."""
    voice = _voice(request)
    synthesizer = voice.synthesizer
    if body.model not in (synthesizer.name, *TTS_MODEL_ALIASES):
        raise OpenAIError(404, f"model {body.model!r} does not exist; speech is served by {synthesizer.name!r}",
                          param="model", code="model_not_found")
    try:
        name = check_voice(synthesizer, body.voice)
    except ValueError as error:
        raise invalid_request(error) from None
    audio = await synthesizer.synthesize(body.input, name, body.speed)
    if body.response_format == "pcm":
        pcm, sample_rate = wav_pcm(audio)
        return Response(pcm, media_type="audio/pcm", headers={"X-Sample-Rate": str(sample_rate)})
    return Response(audio, media_type="audio/wav")
