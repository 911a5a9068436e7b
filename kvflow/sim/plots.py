"""Figures of a plan: SLO attainment against rate per option, and goodput per device of each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvflow.bench.serve.plots import pyplot, save_figure
from kvflow.sim.planner import Option


def plot_plan(options: Sequence[Option], chosen: Option, objective: str, out: str | Path, show: int = 12) -> list[Path]:
    plt = pyplot()
    out = Path(out)
    top = list(options[:show])
    if chosen not in top:
        top.append(chosen)
    fig, ax = plt.subplots(figsize=(8, 5))
    for option in top:
        rates = [r for r, _ in option.goodput.curve]
        attained = [100 * a for _, a in option.goodput.curve]
        ax.plot(rates, attained, "-o", markersize=3, linewidth=2.5 if option is chosen else 1,
                label=option.name + (" (chosen)" if option is chosen else ""))
    ax.set_xscale("log")
    ax.set_xlabel("request rate (req/s, per unit)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title("Attainment against rate, per deployment unit")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths = [save_figure(fig, out / "attainment.png")]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(top) + 1.5))
    names = [o.name for o in top][::-1]
    scores = [o.score(objective) for o in top][::-1]
    colours = ["tab:red" if o is chosen else "tab:blue" for o in top][::-1]
    ax.barh(names, scores, color=colours)
    unit = {"throughput": "req/s per device", "cost": "req/s per $/h", "power": "req/s per kW"}[objective]
    ax.set_xlabel(f"goodput ({unit})")
    ax.set_title("The chosen plan (red) against the alternatives")
    ax.tick_params(axis="y", labelsize=7)
    paths.append(save_figure(fig, out / "goodput.png"))
    return paths
