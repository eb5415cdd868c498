"""`kvserve serve` as a subprocess, and `kvserve bench serve` against the live test server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
from serve_harness import MODEL

from kvserve.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream_lines(url: str, headers: dict[str, str], lines: list[str]) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", headers=headers, json=body, timeout=120) as response:
        lines.extend(line for line in response.iter_lines() if line)


def test_kvserve_serve_subprocess_with_key_from_environment_and_sigterm_drain() -> None:
    port = _free_port()
    env = {**os.environ, "KVSERVE_API_KEY": "env-key"}
    command = [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--kv-cache-memory",
               str(64 * 2**20), "--served-model-name", "tiny", "--log-level", "warning", "--drain-timeout-s", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        headers = {"Authorization": "Bearer env-key"}
        answer = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                            json={"model": "tiny", "prompt": "The capital of France is", "max_tokens": 3,
                                  "temperature": 0}).json()
        assert answer["choices"][0]["text"].startswith(" Paris")

        # SIGTERM with a long stream in flight: /health says draining, and after the 2 s drain timeout the
        # stream ends with an error event and [DONE]; the process exits soon after (it used to wait for it).
        lines: list[str] = []
        client = threading.Thread(target=_stream_lines, args=(url, headers, lines))
        client.start()
        while len(lines) < 3:
            assert client.is_alive() and process.poll() is None, lines
            time.sleep(0.05)
        process.terminate()
        health = httpx.get(f"{url}/health", timeout=10)
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        client.join(60)
        assert lines[-1] == "data: [DONE]" and '"shutting_down"' in lines[-2], lines[-2:]
        process.wait(30)
    finally:
        process.terminate()
        process.wait(30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to exit with it.
    assert process.returncode in (0, -signal.SIGTERM)


def test_bench_serve_prints_json_and_plots(live, tmp_path, capsys) -> None:
    plot = tmp_path / "latency.png"
    main(["bench", "serve", "--url", live.url, "--model", MODEL, "--num-requests", "6", "--request-rate", "50",
          "--concurrency", "3", "--input-len", "16", "--output-len", "4", "--seed", "3", "--plot", str(plot)])
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert "requests: 100%" in printed.err and "6/6" in printed.err  # the progress bar, on stderr
    assert summary["completed"] == 6 and summary["failures"] == 0
    assert summary["total_output_tokens"] > 0 and summary["output_throughput"] > 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert set(summary[metric]) == {"mean", "p50", "p90", "p99"}
        assert summary[metric]["p50"] <= summary[metric]["p99"]
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_the_plot_marks_p50_and_p99(tmp_path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    from kvserve.bench.plot import plot_latencies
    from kvserve.bench.serve import RequestResult

    lines, axvline = [], Axes.axvline

    def recorded(axis, x, **kwargs):
        lines.append((round(x, 1), kwargs["label"]))
        return axvline(axis, x, **kwargs)

    monkeypatch.setattr(Axes, "axvline", recorded)
    # request i: TTFT 10 i ms, TPOT (latency - TTFT) / 9 tokens = i ms
    results = [RequestResult(ok=True, ttft=i / 100, latency=i / 100 + 0.009 * i, output_tokens=10)
               for i in range(1, 11)]
    plot_latencies(results, tmp_path / "latency.png")
    assert lines == [(55.0, "p50 55.0 ms"), (99.1, "p99 99.1 ms"), (5.5, "p50 5.5 ms"), (9.9, "p99 9.9 ms")]
