"""Audio at the voice pipeline's edges: 16 kHz mono float32 samples inside, 16-bit PCM WAV files outside."""

from __future__ import annotations

import io
import wave

import numpy as np

SAMPLE_RATE = 16_000  # Whisper's and Silero's rate; the page's AudioContext resamples the microphone to it


def pcm16_samples(data: bytes) -> np.ndarray:
    """Little-endian 16-bit PCM -> (n,) float32 in [-1, 1)."""
    if len(data) % 2:
        raise ValueError(f"16-bit PCM needs an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """A mono 16-bit WAV file around raw PCM."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(sample_rate)
        file.writeframes(pcm)
    return buffer.getvalue()


def wav_pcm(wav: bytes) -> tuple[bytes, int]:
    """A mono 16-bit WAV file's raw PCM and its sample rate."""
    with wave.open(io.BytesIO(wav), "rb") as file:
        return file.readframes(file.getnframes()), file.getframerate()


def decode_audio(data: bytes) -> np.ndarray:
    """Any file FFmpeg reads (WAV, MP3, Ogg/Opus, WebM, FLAC, ...) -> (n,) float32 at SAMPLE_RATE, mono.

    Raises ValueError for what it cannot decode."""
    import av
    from faster_whisper import decode_audio as whisper_decode

    try:
        return whisper_decode(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except (av.error.FFmpegError, ValueError, IndexError) as error:  # IndexError: a file without an audio stream
        raise ValueError(f"cannot decode the audio file: {error}") from None
