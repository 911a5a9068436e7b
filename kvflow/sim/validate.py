"""How closely simulated runs match measured ones, and how closely measured runs match each other.

The validation criteria of the simulator: TTFT and TPOT p50 / p90 within 10 % of the measured
run, SLO attainment within ±3 points. On a shared machine a run is itself one draw: the same
request stream served twice does not give the same percentiles. So when several replayed runs
carry the same stream (same rate, prompt and output lengths: `kvflow bench serve` with the same
seed), the report also gives the **noise floor** (each run against the median of its repeats,
the best any model could do against a single run) and compares medians over repeats.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from kvflow.bench.serve.metrics import percentile_key

KEYS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")


def figures(summary: dict[str, Any]) -> dict[str, float]:
    """The validated figures of a summary: TTFT/TPOT p50/p90 (ms) and SLO attainment (%)."""
    out = {}
    for metric in ("ttft_ms", "tpot_ms"):
        for p in (50, 90):
            value = summary.get(metric, {}).get(percentile_key(p))
            if value is not None:
                out[f"{metric[:4]}_{percentile_key(p)}"] = float(value)
    attainment = summary.get("goodput", {}).get("attainment", {}).get("all")
    if attainment is not None:
        out["attainment"] = 100.0 * float(attainment)
    return out


def errors(simulated: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """Relative errors (simulated / measured − 1) of the percentiles, and the attainment
    difference in points (`attainment_points`)."""
    out = {k: simulated[k] / measured[k] - 1 for k in KEYS if measured.get(k) and k in simulated}
    if "attainment" in simulated and "attainment" in measured:
        out["attainment_points"] = simulated["attainment"] - measured["attainment"]
    return out


def validation_errors(measured: dict[str, Any], simulated: dict[str, Any]) -> dict[str, float]:
    """`errors` of two summaries."""
    return errors(figures(simulated), figures(measured))


def stream_key(doc: dict[str, Any]) -> tuple[object, ...]:
    """What identifies a request stream in a `kvflow bench serve` result: its planned arrival times
    and lengths (the same seed gives the same ones)."""
    return doc.get("label"), tuple((round(float(r.get("arrival_s", 0.0)), 6), r.get("prompt_len"), r.get("output_len"))
                                   for r in doc["requests"])


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0] if all(k in r for r in rows)}


@dataclass
class Agreement:
    """How many relative errors are within 10 % and 20 %, their median, and attainment within ±3."""

    cells: list[float] = field(default_factory=list)
    points: list[float] = field(default_factory=list)

    def add(self, errs: dict[str, float]) -> None:
        self.cells += [abs(errs[k]) for k in KEYS if k in errs]
        if "attainment_points" in errs:
            self.points.append(abs(errs["attainment_points"]))

    def describe(self) -> str:
        if not self.cells:
            return "nothing to compare"
        n = len(self.cells)
        within = sum(c <= 0.10 for c in self.cells)
        return (f"{within}/{n} percentile cells within 10 % ({100 * within / n:.0f} %), "
                f"{sum(c <= 0.20 for c in self.cells)}/{n} within 20 %, median error "
                f"{100 * statistics.median(self.cells):.1f} %; attainment within 3 points in "
                f"{sum(p <= 3 for p in self.points)}/{len(self.points)} runs")


@dataclass
class ValidationReport:
    """Measured and simulated figures of replayed runs, grouped by request stream."""

    runs: list[tuple[tuple[object, ...], str, dict[str, float], dict[str, float]]] = field(default_factory=list)

    def add(self, name: str, doc: dict[str, Any], measured: dict[str, Any], simulated: dict[str, Any]) -> None:
        requests = doc.get("requests") or [{}]
        mean_in = statistics.mean(r.get("prompt_len") or 0 for r in requests)
        mean_out = statistics.mean(r.get("output_len") or 0 for r in requests)
        described = f"{name} ({doc.get('dataset', '?')} {mean_in:.0f}/{mean_out:.0f})"
        self.runs.append((stream_key(doc), described, figures(measured), figures(simulated)))

    def groups(self) -> dict[tuple[object, ...], list[tuple[str, dict[str, float], dict[str, float]]]]:
        grouped: dict[tuple[object, ...], list[tuple[str, dict[str, float], dict[str, float]]]] = defaultdict(list)
        for key, name, measured, simulated in self.runs:
            grouped[key].append((name, measured, simulated))
        return grouped

    def lines(self) -> list[str]:
        """The summary: per run, over repeats (medians), and the noise floor of the repeats."""
        if not self.runs:
            return []
        single = Agreement()
        for _, _, measured, simulated in self.runs:
            single.add(errors(simulated, measured))
        out = [f"each run: {single.describe()}"]
        repeated = {k: g for k, g in self.groups().items() if len(g) > 1}
        if not repeated:
            return out
        noise, medians = Agreement(), Agreement()
        table = ["| run (median of repeats) | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | attainment |",
                 "|---|---|---|---|---|---|"]
        for group in repeated.values():
            measured = _median([m for _, m, _ in group])
            simulated = _median([s for _, _, s in group])
            for _, m, _ in group:
                noise.add(errors(m, measured))
            errs = errors(simulated, measured)
            medians.add(errs)
            spread = {k: (max(m[k] for _, m, _ in group) / min(m[k] for _, m, _ in group) - 1) / 2 for k in KEYS}
            cells = [f"{measured[k]:.3g} / {simulated[k]:.3g} ({100 * errs[k]:+.0f} %, ±{100 * spread[k]:.0f})"
                     for k in KEYS]
            table.append(f"| {group[0][0]} ×{len(group)} | " + " | ".join(cells)
                         + f" | {measured['attainment']:.1f} / {simulated['attainment']:.1f} |")
        return out + [f"median of repeats: {medians.describe()}",
                      f"noise floor (each run against the median of its repeats): {noise.describe()}",
                      "measured / simulated (error, ± half the spread of the repeats):", *table]
