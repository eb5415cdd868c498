"""Peer benchmark: kvserve against llama.cpp's llama-server and vLLM's CPU build, one server at a time.

settings.py   what to run (flags, smoke sizes)      builds.py   the peers' builds under --work, reused
engines.py    each engine's command line             server.py   one server process: start, ready, peak RSS, stop
measure.py    the workloads, through kvserve's own `kvserve bench serve` client, and llama-bench
report.py     medians over rounds, the issue's target ratios     runner.py   the whole run (benchmarks/bench_peers.py)
"""
