"""Speech for the voice tests: espeak-ng's en-us voice, decoded to 16 kHz float32 samples like microphone audio."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Callable

import numpy as np
import pytest

ESPEAK_MISSING = "the espeak-ng program is not installed (apt-get install espeak-ng)"


@pytest.fixture(scope="session")
def speak() -> Callable[[str], np.ndarray]:
    """text -> espeak-ng's en-us voice saying it, (n,) float32 at 16 kHz; skips without espeak-ng or faster-whisper
    (its decoder resamples)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip(ESPEAK_MISSING)
    pytest.importorskip("faster_whisper", reason="voice extras (faster-whisper) not installed")
    from kvserve.voice.audio import decode_audio

    @functools.cache
    def synthesized(text: str) -> np.ndarray:
        wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
        return decode_audio(wav)

    return lambda text: synthesized(text).copy()  # a copy: faster-whisper's batch VAD writes into its input
