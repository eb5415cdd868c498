"""Structured output (stand-in on the i13-tools branch: the structured-output branch brings the real package)."""
