"""Peer benchmark (benchmarks/bench_peers.py): kvserve against llama.cpp's llama-server and vLLM's CPU build.

settings.py   what to run (flags, smoke sizes)       builds.py    the peers' builds under --work, reused
engines.py    each engine's server command line       hf_export.py the GGUF as a float32 HF directory, for vLLM
server.py     one server process: start, ready, peak RSS, stop
measure.py    the workloads through kvserve's own `kvserve bench serve` client; llama-bench
report.py     medians over rounds and the issue's targets      runner.py    the whole run
"""
