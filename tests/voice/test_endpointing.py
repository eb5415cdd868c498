"""EndOfSpeech: streaming Silero VAD equal to faster-whisper's batch run, and when it says an utterance has ended."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from kvserve.voice.audio import SAMPLE_RATE
from kvserve.voice.endpointing import FRAME, EndOfSpeech

pytest.importorskip("faster_whisper", reason="voice extras (faster-whisper) not installed")

SENTENCE = "The capital of France is Paris."
ODD_SIZES = (1, 511, 513, 1000, 333, 4097, 7, 160)  # fed in turn: pieces that straddle frames, and some under one
STEP = 160  # 10 ms: how precisely the tests locate the end


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * SAMPLE_RATE // 1000, np.float32)


def pieces(audio: np.ndarray, sizes: tuple[int, ...]) -> Iterator[np.ndarray]:
    """`audio` cut into consecutive pieces of the given sizes, in turn."""
    start, turn = 0, 0
    while start < len(audio):
        size = sizes[turn % len(sizes)]
        yield audio[start:start + size]
        start, turn = start + size, turn + 1


def end_sample(detector: EndOfSpeech, audio: np.ndarray) -> int | None:
    """How many samples of `audio`, fed STEP at a time, it took for `detector` to end the utterance (None: never)."""
    for fed, piece in enumerate(pieces(audio, (STEP,)), start=1):
        if detector.feed(piece):
            return min(fed * STEP, len(audio))
    return None


def batch_probabilities(audio: np.ndarray) -> np.ndarray:
    """faster-whisper's own VAD run over whole frames of `audio`, one probability a frame."""
    from faster_whisper.vad import get_vad_model

    whole = audio[: len(audio) // FRAME * FRAME].copy()  # a copy: it writes into its input
    return np.asarray(get_vad_model()(whole)).reshape(-1)


def speech_stop_sample(audio: np.ndarray, threshold: float = 0.5) -> int:
    """Where the VAD stops hearing speech: the end of the last frame at or above `threshold`."""
    speech_frames = np.flatnonzero(batch_probabilities(audio) >= threshold)
    assert len(speech_frames), "the VAD heard no speech in the test audio"
    return int(speech_frames[-1] + 1) * FRAME


@pytest.fixture(scope="module")
def utterance(speak: Callable[[str], np.ndarray]) -> np.ndarray:
    """Half a second of silence, the sentence spoken, two seconds of silence."""
    return np.concatenate([silence(500), speak(SENTENCE), silence(2000)])


@pytest.fixture(scope="module")
def speech_only(speak: Callable[[str], np.ndarray]) -> np.ndarray:
    return np.concatenate([silence(500), speak(SENTENCE)])


def test_streaming_probabilities_equal_the_batch_ones(utterance: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    streamed: list[np.ndarray] = []
    original = EndOfSpeech._speech_probabilities

    def recording(self: EndOfSpeech, frames: np.ndarray) -> np.ndarray:
        probabilities = original(self, frames)
        streamed.append(probabilities)
        return probabilities

    monkeypatch.setattr(EndOfSpeech, "_speech_probabilities", recording)
    detector = EndOfSpeech(silence_ms=60_000)  # never ends: every frame gets looked at
    for piece in pieces(utterance, ODD_SIZES):
        assert not detector.feed(piece)
    expected = batch_probabilities(utterance)
    assert len(streamed) > 1  # the probabilities came in several calls
    assert expected.max() > 0.9 and expected.min() < 0.1  # the audio has speech and silence
    np.testing.assert_array_equal(np.concatenate(streamed), expected)


def test_silence_alone_never_ends_an_utterance() -> None:
    detector = EndOfSpeech(silence_ms=100)
    for piece in pieces(silence(3000), ODD_SIZES):
        assert not detector.feed(piece)
    assert not detector.speech_started
    assert not detector.ended


@pytest.mark.parametrize("silence_ms", [300, 500, 800])
def test_speech_then_silence_ends_silence_ms_after_the_speech(utterance: np.ndarray, silence_ms: int) -> None:
    detector = EndOfSpeech(silence_ms=silence_ms)
    end = end_sample(detector, utterance)
    assert end is not None
    assert detector.speech_started
    stop = speech_stop_sample(utterance)
    waited_ms = (end - stop) * 1000 / SAMPLE_RATE
    frame_ms = FRAME * 1000 / SAMPLE_RATE
    step_ms = STEP * 1000 / SAMPLE_RATE
    assert silence_ms - frame_ms <= waited_ms <= silence_ms + frame_ms + step_ms


def test_a_longer_silence_ms_ends_later(utterance: np.ndarray) -> None:
    ends = [end_sample(EndOfSpeech(silence_ms=silence_ms), utterance) for silence_ms in (200, 500, 1000)]
    assert None not in ends
    assert ends == sorted(ends) and len(set(ends)) == 3


def test_speech_without_trailing_silence_does_not_end(speech_only: np.ndarray) -> None:
    detector = EndOfSpeech(silence_ms=500)
    assert end_sample(detector, speech_only) is None
    assert detector.speech_started  # it heard the speech; it is waiting for the silence


def test_once_ended_feed_keeps_returning_true(utterance: np.ndarray, speech_only: np.ndarray) -> None:
    detector = EndOfSpeech(silence_ms=300)
    assert end_sample(detector, utterance) is not None
    speech_frames = detector.speech_frames
    for piece in pieces(speech_only, ODD_SIZES):  # more speech does not reopen the utterance
        assert detector.feed(piece)
    assert detector.feed(np.zeros(0, np.float32))
    assert detector.speech_frames == speech_frames
