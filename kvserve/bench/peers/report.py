"""From raw rows to the report: medians over rounds per engine and level, peak RSS, and the issue's targets."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

METRICS = ("output_tok_s", "decode_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms")
MB = 1_000_000  # the issue states its memory goal in MB


def median_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{engine: {level: {metric: median over rounds, rounds, failures, lengths_match}}} of the measured rows."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    samples: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        if "engine" not in row or row.get("level") in (None, "server"):
            continue
        cell = table.setdefault(row["engine"], {}).setdefault(
            row["level"], {"rounds": 0, "failures": 0, "lengths_match": True})
        cell["rounds"] += 1
        cell["failures"] += row.get("failures", 0)
        cell["lengths_match"] = cell["lengths_match"] and bool(row.get("lengths_match"))
        for metric in METRICS:
            if row.get(metric) is not None:
                samples.setdefault((row["engine"], row["level"], metric), []).append(row[metric])
    for (engine, level, metric), values in samples.items():
        table[engine][level][metric] = round(statistics.median(values), 2)
    return table


def peak_rss_mb(rows: list[dict[str, Any]]) -> dict[str, float]:
    """{engine: the highest peak RSS (MB) of its server over the rounds}."""
    peaks: dict[str, float] = {}
    for row in rows:
        if row.get("level") == "server" and row.get("peak_rss_bytes"):
            peaks[row["engine"]] = max(peaks.get(row["engine"], 0.0), round(row["peak_rss_bytes"] / MB, 1))
    return peaks


@dataclass(frozen=True)
class Target:
    """One of the issue's goals: `mine` against `peer` on one metric, as a ratio (or a difference) vs a bound."""

    mine: str
    peer: str
    level: str  # a level of the table, or "peak_rss" for the memory goal
    metric: str
    bound: float
    is_difference: bool = False  # mine - peer <= bound (MB) instead of mine / peer >= bound

    @property
    def name(self) -> str:
        """A readable key: 'kvserve-f32/vllm c16 output_tok_s', 'kvserve-llama.cpp peak_rss_mb'."""
        if self.is_difference:
            return f"{self.mine}-{self.peer} {self.metric}"
        return f"{self.mine}/{self.peer} {self.level} {self.metric}"


def issue_targets(levels: tuple[int, ...]) -> list[Target]:
    """Issue 14's goals: kvserve-f32 >= 1.25x vLLM at batch-1 decode and at every level; kvserve on the 4-bit file
    (by default, kvserve-int8 with llama.cpp's arithmetic, kvserve-f16kv with llama.cpp's KV cache) >= 1x llama.cpp
    at batch-1 decode and >= 3x at 16 and 64 streams, its peak RSS <= llama.cpp's + 300 MB."""
    targets = [Target("kvserve-f32", "vllm", "decode_b1", "decode_tok_s", 1.25)]
    targets += [Target("kvserve-f32", "vllm", f"c{streams}", "output_tok_s", 1.25) for streams in levels]
    for mine in ("kvserve", "kvserve-int8", "kvserve-f16kv"):
        targets.append(Target(mine, "llama.cpp", "decode_b1", "decode_tok_s", 1.0))
        targets += [Target(mine, "llama.cpp", f"c{streams}", "output_tok_s", 3.0) for streams in (16, 64)]
        targets.append(Target(mine, "llama.cpp", "peak_rss", "peak_rss_mb", 300.0, is_difference=True))
    return targets


def _operands(target: Target, table: dict[str, Any], rss: dict[str, float]) -> tuple[float | None, float | None]:
    if target.is_difference:
        return rss.get(target.mine), rss.get(target.peer)
    def value(engine: str) -> float | None:
        return table.get(engine, {}).get(target.level, {}).get(target.metric)
    return value(target.mine), value(target.peer)


def evaluate(target: Target, table: dict[str, Any], rss: dict[str, float]) -> dict[str, Any]:
    """{value, goal, met}; value and met are None when either side was not measured (or a ratio's peer is 0)."""
    mine, peer = _operands(target, table, rss)
    goal = f"<= {target.bound:g}" if target.is_difference else f">= {target.bound:g}"
    if mine is None or peer is None or (not target.is_difference and not peer):
        return {"value": None, "goal": goal, "met": None}
    if target.is_difference:
        value = round(mine - peer, 1)
        return {"value": value, "goal": goal, "met": value <= target.bound}
    value = round(mine / peer, 3)
    return {"value": value, "goal": goal, "met": value >= target.bound}


def build_report(rows: list[dict[str, Any]], levels: tuple[int, ...]) -> dict[str, Any]:
    """The summary part of the JSON: medians, peak RSS, and each target with met: true/false (None: unmeasured)."""
    table = median_table(rows)
    rss = peak_rss_mb(rows)
    return {"median_over_rounds": table, "peak_rss_mb": rss,
            "targets": {target.name: evaluate(target, table, rss) for target in issue_targets(levels)}}
