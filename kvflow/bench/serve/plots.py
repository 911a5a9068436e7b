"""PNG plots of serving runs (matplotlib, Agg backend: no display needed).

* one run: latency CDFs (TTFT, TPOT, E2E; a CDF shows every percentile at once, and where the SLO
  line crosses it is the attainment) and, with SLOs, attainment per SLO plus attainment as the
  SLOs are scaled (how much slack the server has, or how far it is from meeting them);
* several runs (``serve-plot``): the same CDFs overlaid, and per label (e.g. kvflow, vllm) the
  TTFT / TPOT percentiles, throughput, goodput and attainment against the request rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvflow.bench.serve.metrics import percentile_key

_CDF_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))
_SLO_OF = {"ttft_s": "ttft", "tpot_s": "tpot", "e2e_s": "e2e"}
_SCALES = np.geomspace(0.25, 4.0, 33)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path

def _values_ms(doc: dict[str, Any], key: str) -> np.ndarray:
    """One per-request metric (ms) of the successful requests that have it."""
    vals = [r[key] for r in doc["requests"] if r.get("success") and r.get(key) is not None]
    return np.sort(np.asarray(vals, dtype=np.float64) * 1000.0)


def _slos(doc: dict[str, Any]) -> dict[str, float]:
    return dict((doc["summary"].get("goodput") or {}).get("slos_ms") or {})


def _cdf(ax: Any, values_ms: np.ndarray, **kwargs: Any) -> None:
    if len(values_ms):
        ax.step(values_ms, np.arange(1, len(values_ms) + 1) / len(values_ms), where="post", **kwargs)


def _run_name(doc: dict[str, Any]) -> str:
    return f"{doc['label']} @ {doc['rate_label']}"


def _attainment_curve(doc: dict[str, Any], metric: str | None, scales: np.ndarray) -> np.ndarray:
    """Fraction of all requests meeting ``metric``'s SLO (all SLOs if None) scaled by each factor."""
    slos = _slos(doc)
    reqs = doc["requests"]
    n = max(len(reqs), 1)
    keys = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s"}
    chosen = [metric] if metric else list(slos)
    out = []
    for s in scales:
        good = 0
        for r in reqs:
            if not r.get("success"):
                continue
            ok = True
            for m in chosen:
                v = r.get(keys[m])
                if v is not None and v * 1000.0 > slos[m] * s:
                    ok = False
                    break
            good += ok
        out.append(good / n)
    return np.asarray(out)


def plot_run(doc: dict[str, Any], out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``STEM-cdf.png`` and, when SLOs were given, ``STEM-attainment.png``; return paths."""
    plt = pyplot()
    out_dir = Path(out_dir)  # save_figure creates it
    slos = _slos(doc)
    paths: list[Path] = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, name) in zip(axes, _CDF_METRICS):
        _cdf(ax, _values_ms(doc, key), color="C0")
        slo = slos.get(_SLO_OF[key])
        if slo:
            ax.axvline(slo, color="C3", linestyle="--", label=f"SLO {slo:g} ms")
            ax.legend(loc="lower right")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs: {_run_name(doc)} ({doc['dataset']})")
    paths.append(save_figure(fig, out_dir / f"{stem}-cdf.png"))

    if slos:
        att = doc["summary"]["goodput"]["attainment"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
        names = list(att)
        bars = left.bar(names, [100 * att[k] for k in names], color=[f"C{i}" for i in range(len(names))])
        left.bar_label(bars, fmt="%.1f%%")
        left.set_ylim(0, 110)
        left.set_ylabel("requests meeting the SLO (%)")
        left.set_title("SLO attainment (" + ", ".join(f"{k} {v:g} ms" for k, v in slos.items()) + ")")
        for i, m in enumerate(slos):
            right.plot(_SCALES, 100 * _attainment_curve(doc, m, _SCALES), label=m, color=f"C{i}")
        right.plot(_SCALES, 100 * _attainment_curve(doc, None, _SCALES), label="all", color="k", lw=2)
        right.axvline(1.0, color="grey", linestyle=":")
        right.set_xscale("log", base=2)
        right.set_xticks([0.25, 0.5, 1, 2, 4], ["0.25", "0.5", "1", "2", "4"])
        right.set_xlabel("SLO scale (x the given SLOs)")
        right.set_ylabel("attainment (%)")
        right.set_ylim(0, 105)
        right.grid(alpha=0.3)
        right.legend()
        fig.suptitle(f"SLO attainment: {_run_name(doc)}")
        paths.append(save_figure(fig, out_dir / f"{stem}-attainment.png"))
    return paths


def _rate_sort_key(label: str) -> tuple[int, float, str]:
    try:
        value = float(label)
    except ValueError:
        return (2, 0.0, label)
    return (1 if math.isinf(value) else 0, value, label)


def _num(value: Any) -> float:
    """A summary number as float (``None`` / strings such as "inf" -> NaN / inf)."""
    if value is None:
        return math.nan
    return float(value)


def plot_compare(docs: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """One figure comparing runs: overlaid CDFs, and per-label metrics against the request rate."""
    if not docs:
        raise ValueError("nothing to plot: no result files")
    plt = pyplot()
    labels = list(dict.fromkeys(d["label"] for d in docs))
    rates = sorted({d["rate_label"] for d in docs}, key=_rate_sort_key)
    x_of = {r: i for i, r in enumerate(rates)}
    docs = sorted(docs, key=lambda d: (labels.index(d["label"]), x_of[d["rate_label"]]))
    color = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    styles = ["-", "--", "-.", ":"]

    fig, axes = plt.subplots(2, 4, figsize=(21, 9))
    for col, (key, name) in enumerate(_CDF_METRICS):
        ax = axes[0][col]
        for d in docs:
            style = styles[x_of[d["rate_label"]] % len(styles)]
            _cdf(ax, _values_ms(d, key), color=color[d["label"]], linestyle=style, label=_run_name(d))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")

    by_label = {
        lab: sorted((d for d in docs if d["label"] == lab), key=lambda d: x_of[d["rate_label"]])
        for lab in labels
    }

    def per_rate(ax: Any, getter: Any, ylabel: str, plot_title: str, style: str = "-o", suffix: str = "") -> None:
        for lab, runs in by_label.items():
            xs = [x_of[d["rate_label"]] for d in runs]
            ys = [getter(d) for d in runs]
            ax.plot(xs, ys, style, color=color[lab], label=lab + suffix)
        ax.set_xticks(range(len(rates)), rates)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(plot_title)
        ax.grid(alpha=0.3)

    per_rate(axes[0][3], lambda d: _num(d["summary"]["output_throughput"]), "tok/s", "Output throughput")
    axes[0][3].legend(fontsize=8)
    for ax, key, name in ((axes[1][0], "ttft_ms", "TTFT"), (axes[1][1], "tpot_ms", "TPOT")):
        pcts = docs[0]["summary"].get("percentiles") or [50, 99]
        high = percentile_key(max(pcts))
        per_rate(ax, lambda d, k=key: _num(d["summary"][k]["median"]), "ms", f"{name}: median (solid), {high} (dashed)")
        per_rate(ax, lambda d, k=key, h=high: _num(d["summary"][k].get(h)), "ms",
                 f"{name}: median (solid), {high} (dashed)",
                 style="--s", suffix=f" {high}")
        ax.legend(fontsize=8)
    have_slos = [d for d in docs if d["summary"].get("goodput")]
    if have_slos:
        per_rate(axes[1][2], lambda d: _num((d["summary"].get("goodput") or {}).get("request_goodput")),
                 "req/s", "Goodput (requests meeting all SLOs)")
        per_rate(axes[1][3],
                 lambda d: 100 * _num(((d["summary"].get("goodput") or {}).get("attainment") or {}).get("all")),
                 "%", "SLO attainment (all SLOs)")
        axes[1][3].set_ylim(0, 105)
        slo_text = ", ".join(f"{k} {v:g} ms" for k, v in have_slos[0]["summary"]["goodput"]["slos_ms"].items())
        axes[1][2].annotate(f"SLOs: {slo_text}", xy=(0.02, 0.02), xycoords="axes fraction", fontsize=8)
    else:
        for ax in (axes[1][2], axes[1][3]):
            ax.text(0.5, 0.5, "no --goodput SLOs in these runs", ha="center", va="center")
            ax.set_axis_off()
    fig.suptitle(title or "Serving benchmark: " + " vs ".join(labels))
    return save_figure(fig, Path(out))
