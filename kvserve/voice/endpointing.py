"""End of speech: Silero VAD (the ONNX model that ships inside faster-whisper) over the incoming audio, 32 ms
at a time, its recurrent state carried from frame to frame so that each sample is looked at once."""

from __future__ import annotations

import numpy as np

from kvserve.voice.audio import SAMPLE_RATE

FRAME = 512  # samples per VAD frame (32 ms), the size Silero v5/v6 takes at 16 kHz
CONTEXT = 64  # samples of the previous frame the model sees before each frame


class EndOfSpeech:
    """Says when an utterance has ended: `silence_ms` of non-speech after at least `min_speech_ms` of speech.

    The silence wait is the price of endpointing: it is spent before the transcript can start, so it is
    counted in the pipeline's latency budget (pipeline.TurnTimings).
    """

    def __init__(self, silence_ms: int = 500, min_speech_ms: int = 150, threshold: float = 0.5) -> None:
        from faster_whisper.vad import get_vad_model

        self.session = get_vad_model().session
        self.silence_frames = max(1, round(silence_ms * SAMPLE_RATE / 1000 / FRAME))
        self.min_speech_frames = max(1, round(min_speech_ms * SAMPLE_RATE / 1000 / FRAME))
        self.threshold = threshold
        self._state = (np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32))  # LSTM h, c
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        self.speech_frames = 0
        self.trailing_silence = 0
        self.ended = False

    @property
    def speech_started(self) -> bool:
        return self.speech_frames >= self.min_speech_frames

    def feed(self, samples: np.ndarray) -> bool:
        """Look at (n,) more samples; True once the utterance has ended (and from then on)."""
        if self.ended:
            return True
        self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        usable = len(self._pending) // FRAME * FRAME
        if usable == 0:
            return False
        frames = self._pending[:usable].reshape(-1, FRAME)
        self._pending = self._pending[usable:]
        for probability in self._speech_probabilities(frames):
            if probability >= self.threshold:
                self.speech_frames += 1
                self.trailing_silence = 0
            elif self.speech_started:
                self.trailing_silence += 1
                if self.trailing_silence >= self.silence_frames:
                    self.ended = True
                    break
        return self.ended

    def _speech_probabilities(self, frames: np.ndarray) -> np.ndarray:
        """(k, FRAME) -> (k,) speech probabilities; each frame prefixed with the last CONTEXT samples before it."""
        contexts = np.concatenate([self._context[None], frames[:-1, -CONTEXT:]])
        self._context = frames[-1, -CONTEXT:].copy()
        h, c = self._state
        output, h, c = self.session.run(None, {"input": np.concatenate([contexts, frames], 1), "h": h, "c": c})
        self._state = (h, c)
        return np.asarray(output).reshape(-1)
