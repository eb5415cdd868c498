#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, in under 8 minutes, every GPU test, then kvserve vs transformers
# at batch 1, 32 and 256 with and without CUDA graphs (benchmarks/bench_gpu_batches.py), then the Triton kernel
# suites compiled (CI runs them under the interpreter). Writes $OUT/gpu_check.json, beside each step's log.
#
#   here, with the package registries:  make gpu-wheels     (what the device image lacks, for Python 3.12, in .whl/)
#   on the GPU machine:                 bash benchmarks/gpu_check.sh   (the device tool: carry [".whl"])
#
# It runs the image's python3 (torch with CUDA, Triton, transformers) on this checkout through PYTHONPATH: nothing
# is built. Each step gets what is left of the budget (BUDGET_S, default 470 s), so a hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-470} ))
mkdir -p "$OUT"

if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check.sh: $PY's torch sees no CUDA device; this check needs an NVIDIA GPU" >&2
    exit 2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvserve-site \
        .whl/*.whl || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/kvserve-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/nvidia-smi.csv" 2>&1

# step NAME CAP_S COMMAND...: run with at most CAP_S seconds (or what is left), log to $OUT/NAME.log, keep its rc.
declare -A RC
step() {
    local name=$1 cap=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    (( left < cap )) && cap=$left
    if (( cap <= 10 )); then RC[$name]=skipped; echo "== $name: no time left" >&2; return; fi
    echo "== $name (at most ${cap} s): $*" >&2
    timeout "$cap" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
    RC[$name]=$?
    echo "== $name: rc ${RC[$name]}" >&2
    tail -n 3 "$OUT/$name.log" >&2
}

GPU_TESTS=$(grep -rl --include='test_*.py' "mark.gpu" tests | sort)
step pytest_gpu 200 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu $GPU_TESTS
step bench_gpu_batches 220 "$PY" benchmarks/bench_gpu_batches.py
step pytest_triton 150 "$PY" -m pytest -q -p no:cacheprovider -rs -m "not gpu" tests/attention/test_triton_attention.py \
    tests/layers/test_triton_int.py tests/layers/test_triton_fused.py tests/runner/test_decode_graphs.py

# One JSON: each step's rc and pytest summary, and the benchmark's own JSON.
RC_PYTEST_GPU=${RC[pytest_gpu]} RC_BENCH=${RC[bench_gpu_batches]} RC_TRITON=${RC[pytest_triton]} OUT="$OUT" \
"$PY" - <<'EOF'
import json, os, pathlib, subprocess

out = pathlib.Path(os.environ["OUT"])


def tail(name: str) -> str:
    path = out / f"{name}.out"
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else ""


try:
    bench = json.loads((out / "bench_gpu_batches.out").read_text())
except (OSError, ValueError):
    bench = None
# COMMIT: set by the caller where the checkout travels without .git (the device tool copies the working tree).
commit = os.environ.get("COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                     text=True).stdout.strip() or None
report = {
    "commit": commit,
    "nvidia_smi": (out / "nvidia-smi.csv").read_text().strip(),
    "pytest_gpu": {"rc": os.environ["RC_PYTEST_GPU"], "summary": tail("pytest_gpu")},
    "pytest_triton_compiled": {"rc": os.environ["RC_TRITON"], "summary": tail("pytest_triton")},
    "bench_gpu_batches": {"rc": os.environ["RC_BENCH"], "result": bench},
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if k != "bench_gpu_batches"}, indent=2))
EOF
[[ ${RC[pytest_gpu]} == 0 && ${RC[bench_gpu_batches]} == 0 && ${RC[pytest_triton]} == 0 ]]
