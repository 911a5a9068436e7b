"""Bar chart of throughput reports: output tokens/s per backend, one panel per workload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvflow.bench.serve.plots import pyplot, save_figure

WORKLOADS = ("offline", "single")


def _panel_title(workload: str, run: dict[str, Any]) -> str:
    lengths = f"{run['input_len']}/{run['output_len']}"
    if workload == "offline":
        return f"offline ({run['num_prompts']} prompts × {lengths})"
    return f"single stream ({lengths})"


def plot_throughput(reports: list[Path], out: Path, title: str | None = None) -> Path:
    """One bar per (backend, workload) of the given `kvflow bench throughput` JSON reports; when
    several reports hold the same backend and workload, the later report wins."""
    plt = pyplot()
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    model = None
    for path in reports:
        report = json.loads(Path(path).read_text())
        if report.get("kind") != "throughput":
            raise ValueError(f"{path} is not a `kvflow bench throughput` report")
        model = model or Path(report["model"]).name
        for run in report["runs"]:
            runs[(run["backend"], run["workload"])] = run
    if not runs:
        raise ValueError("the reports hold no runs")
    workloads = [w for w in WORKLOADS if any(k[1] == w for k in runs)]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        items = [(b, r) for (b, w), r in runs.items() if w == workload]
        names = [b for b, _ in items]
        values = [r["output_tok_s"] for _, r in items]
        bars = ax.bar(names, values, color=["#d62728" if n == "kvflow" else "#7f7f7f" for n in names])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2)
        ax.set_title(_panel_title(workload, items[0][1]))
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(0, max(values) * 1.15)
    fig.suptitle(title or f"{model}: throughput on this machine (same run, same token ids)")
    return save_figure(fig, out, dpi=120)
