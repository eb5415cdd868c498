"""The `kvserve` command line, run as a subprocess on the bundled model."""

from __future__ import annotations

import subprocess
import sys

KV_CACHE = ["--kv-cache-memory", str(64 * 2**20)]


def kvserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvserve.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_generate_streams_text_and_verbose_metrics() -> None:
    result = kvserve("generate", "The capital of France is", "--max-tokens", "8", *KV_CACHE, "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Paris" in result.stdout  # greedy by default
    assert "TTFT" in result.stderr and "KV blocks in use: 0 / 91" in result.stderr
    assert "prompt tokens: 5, generated: 8" in result.stderr
    assert "kvserve: SmolLM2-135M-Instruct.Q4_1.gguf ready in " in result.stderr  # the ready line
    assert "91 blocks of 16 tokens = 1,456 tokens of context; max_model_len 1,456" in result.stderr


def test_chat_one_message() -> None:
    result = kvserve("chat", "--message", "Hi", "--max-tokens", "8", *KV_CACHE)
    assert result.returncode == 0, result.stderr
    echo, _, answer = result.stdout.partition("\n")
    assert echo == "> Hi"
    assert answer.strip()


def test_bad_sampling_flag_exits_nonzero_naming_the_field() -> None:
    result = kvserve("generate", "Hello", "--max-tokens", "0", *KV_CACHE)
    assert result.returncode != 0
    assert "max_tokens must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_sampling_flags_are_checked_before_the_model_loads() -> None:
    # A typo in --max-tokens should not cost a model load: with a model path that does not exist,
    # the sampling error must still be the one reported.
    result = kvserve("generate", "Hello", "--max-tokens", "0", "--model", "/nonexistent/model.gguf")
    assert result.returncode != 0
    assert "max_tokens must be >= 1" in result.stderr


def test_bad_engine_flag_exits_nonzero_naming_the_field() -> None:
    result = kvserve("generate", "Hello", "--block-size", "0")
    assert result.returncode != 0
    assert "block_size must be >= 1" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_engine_and_sampling_flags() -> None:
    result = kvserve("generate", "--help")
    assert result.returncode == 0
    for flag in ("--block-size", "--max-num-seqs", "--kv-cache-memory", "--enable-chunked-prefill",
                 "--max-tokens", "--temperature", "--verbose"):
        assert flag in result.stdout, flag
    top = kvserve("--help")
    assert top.returncode == 0 and "generate" in top.stdout and "chat" in top.stdout
