"""`kvserve chat`: its commands, an empty line, the answer limit said aloud, and Ctrl-C stopping an answer (not
the session) with the aborted request's KV blocks freed."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import types

import pytest

from kvserve import LLM, SamplingParams
from kvserve.chat import HELP, ChatSession, interrupts_as_flag
from kvserve.cli import stream_to_stdout

KV_CACHE = ["--kv-cache-memory", str(64 * 2**20)]


def test_an_interactive_session_survives_an_empty_line_and_says_what_it_does() -> None:
    typed = "\nWhat is the capital of France?\n/reset\n/help\nHello\n/exit\nnot read\n"
    result = subprocess.run([sys.executable, "-m", "kvserve.cli", "chat", "--max-tokens", "4", *KV_CACHE],
                            input=typed, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("kvserve chat with SmolLM2-135M-Instruct.Q4_1.gguf; answers of up to 4 tokens")
    assert out.count("[cut at 4 tokens: --max-tokens sets the limit]") == 2  # both questions answered
    assert "(conversation cleared)" in out and out.count(HELP) == 2  # the banner's and /help's


def _output(text: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(outputs=[types.SimpleNamespace(delta_text=text)])


def test_a_stopped_stream_is_closed(capsys: pytest.CaptureFixture[str]) -> None:
    closed = []

    def stream():
        try:
            for word in ("a", "b", "c", "d"):
                yield _output(word)
        finally:
            closed.append(True)  # LLM.stream aborts its request here

    checks, outputs = itertools.count(1), stream()  # held here: only an explicit close() ends it now
    last = stream_to_stdout(outputs, stop=lambda: next(checks) == 2)
    assert last.outputs[0].delta_text == "b" and closed == [True]
    assert capsys.readouterr().out == "ab\n"


def test_ctrl_c_sets_a_flag_instead_of_raising() -> None:
    previous = signal.getsignal(signal.SIGINT)
    with interrupts_as_flag() as interrupted:
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted()
    assert signal.getsignal(signal.SIGINT) is previous


def test_ctrl_c_stops_the_answer_and_frees_its_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    llm = LLM(kv_cache_memory=64 * 2**20, show_progress=False)
    stream = llm.stream

    def interrupted_after_three_tokens(prompt, params):
        for count, output in enumerate(stream(prompt, params), start=1):
            if count == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the answer streams
            yield output

    llm.stream = interrupted_after_three_tokens
    session = ChatSession(llm, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    try:
        output = session.answer("Tell me a long story.")
        assert "[stopped]" in capsys.readouterr().out
        assert len(output.outputs[0].token_ids) == 3 and not output.finished
        assert llm.stats().kv_blocks_used == 0  # the aborted request gave its blocks back
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        assert session.handle("/reset") and session.messages == []
        assert not session.handle("/exit")
    finally:
        llm.engine.shutdown()
