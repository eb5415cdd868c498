"""One engine's server process: start it in its own session, wait until it serves, read its peak RSS, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from kvserve.bench.peers.engines import HOST, Launch


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def stat_session(stat_text: str) -> int:
    """The session id in a /proc/<pid>/stat line (fields after the command name, which may hold spaces)."""
    after_name = stat_text.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
    return int(after_name[3])


def status_vmhwm_kib(status_text: str) -> int:
    """VmHWM (the process's peak resident set) in KiB from /proc/<pid>/status; 0 for a kernel thread."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def session_peak_rss_bytes(session_id: int, proc: Path = Path("/proc")) -> int:
    """Sum of VmHWM over the live processes of a session: a server and the children it started (vLLM's engine
    core). Peaks of different processes need not coincide, so this is an upper bound of their joint peak."""
    total_kib = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if stat_session((entry / "stat").read_text()) == session_id:
                total_kib += status_vmhwm_kib((entry / "status").read_text())
        except (OSError, IndexError, ValueError):  # the process ended while we read it
            continue
    return total_kib * 1024


class ServerProcess:
    """A server started in a new session (its pid is the session id), so that its children stop with it."""

    def __init__(self, launch: Launch, port: int, log_path: Path) -> None:
        self.launch, self.port, self.log_path = launch, port, log_path
        self.url = f"http://{HOST}:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait for GET /v1/models to answer 200; returns the seconds that took."""
        began = time.perf_counter()
        env = {**os.environ, **self.launch.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.launch.argv, cwd=self.launch.cwd, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = began + self.launch.start_timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.launch.name} exited with {self.process.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if self._answers():
                return time.perf_counter() - began
            time.sleep(1.0)
        raise RuntimeError(f"{self.launch.name} not ready after {self.launch.start_timeout_s:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def peak_rss_bytes(self) -> int:
        """Peak RSS of the server and its children so far (read before stop: VmHWM dies with the process)."""
        return session_peak_rss_bytes(self.process.pid) if self.process else 0

    def log_tail(self, num_lines: int = 20) -> str:
        """The last lines the server wrote."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server; then SIGTERM and SIGKILL whatever of its session (process group) is left."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group id is the pid we started (start_new_session)
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        process.wait(timeout=30)
