"""The benchmark scripts: --help anywhere (they import and parse), and the GPU ones exit clearly without CUDA."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["bench_gpu_throughput.py", "bench_gpu_latency.py", "bench_gpu_batches.py"]


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_without_a_gpu(script: str) -> None:
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "--models" in result.stdout and "--skip-hf" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", SCRIPTS)
def test_exits_clearly_without_cuda(script: str) -> None:
    result = run(script, "--models", "smollm2-135m")
    assert result.returncode == 2
    assert "needs an NVIDIA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_exits_clearly_without_cuda(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}, check=False)
    assert result.returncode == 2
    assert "sees no CUDA device; this check needs an NVIDIA GPU" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing ran


CPU_SCRIPTS = [("bench_offline.py", "--kv-cache-memory"), ("bench_kv.py", "--cache-sizes"),
               ("bench_mla.py", "--contexts"), ("bench_quant.py", "--calibration-tokens"),
               ("bench_peers.py", "--setup-only"), ("bench_spec.py", "--num-speculative-tokens"),
               ("bench_startup.py", "--rounds"), ("bench_disagg.py", "--long-words")]


@pytest.mark.parametrize(("script", "flag"), CPU_SCRIPTS)
def test_cpu_benchmarks_parse_their_flags(script: str, flag: str) -> None:
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout
