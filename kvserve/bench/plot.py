"""PNG of a serving benchmark: TTFT and TPOT distributions, their p50 and p99 marked."""

from __future__ import annotations

import pathlib

import numpy as np

from kvserve.bench.serve import RequestResult

MARKED = {50: "tab:green", 99: "tab:red"}  # percentile -> line colour


def plot_latencies(results: list[RequestResult], path: str | pathlib.Path, title: str = "") -> None:
    """Histograms of TTFT and TPOT (milliseconds) of the successful requests, side by side, with a line at each
    one's p50 and p99."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    series = {"TTFT (ms)": [r.ttft * 1000 for r in done if r.ttft is not None],
              "TPOT (ms)": [r.tpot * 1000 for r in done if r.tpot is not None]}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (label, values) in zip(axes, series.items(), strict=True):
        axis.hist(values, bins=min(30, max(1, len(values))), color="tab:blue", alpha=0.8)
        for percentile, colour in MARKED.items() if values else ():
            at = float(np.percentile(values, percentile))
            axis.axvline(at, color=colour, linestyle="--", label=f"p{percentile} {at:.1f} ms")
        if values:
            axis.legend()
        axis.set_xlabel(label)
        axis.set_ylabel("requests")
        axis.set_title(f"{label.split()[0]}: n={len(values)}")
    figure.suptitle(title or f"kvserve bench serve: {len(done)} requests")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
