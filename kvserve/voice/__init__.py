"""Voice mode: speech in, speech out, offline. Whisper tiny.en (faster-whisper) hears, Silero VAD finds the end
of an utterance, espeak-ng (or Piper) speaks; pipeline.py streams each stage into the next."""
