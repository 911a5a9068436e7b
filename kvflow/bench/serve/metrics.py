"""From per-request timings to the numbers a serving benchmark reports.

* throughput: completed requests, output tokens and all tokens per second of the run;
* latency distributions (ms): mean, median, std, min, max and the chosen percentiles of TTFT,
  TPOT, ITL (all gaps of all requests pooled) and E2E;
* goodput: requests per second that met every SLO given with ``--goodput`` (ttft, tpot, e2e, in
  ms); a throughput that counts only useful work, since a fast server that misses its latency
  targets serves nobody. A request with one output token has no TPOT and meets any TPOT SLO.
* SLO attainment: the fraction of all requests sent (failed ones miss every SLO) meeting each SLO,
  and all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvflow.bench.serve.client import RequestResult

#: ``--goodput`` keys and the metric each constrains.
SLO_METRICS: dict[str, str] = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}
DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 200.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"--goodput expects KEY:MS with KEY in ttft, tpot, e2e; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        slos[SLO_METRICS[key]] = ms
    return slos


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99"`` -> ``(50.0, 90.0, 99.0)``, each in [0, 100]."""
    values = tuple(float(p) for p in text.split(",") if p.strip())
    if not values or any(not 0 <= p <= 100 for p in values):
        raise ValueError(f"percentiles must be numbers in [0, 100], got {text!r}")
    return values


def percentile_key(p: float) -> str:
    """Key of a percentile in the summary: 99 -> ``p99``, 99.9 -> ``p99.9``."""
    return f"p{p:g}"


def distribution(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """Summary statistics in milliseconds of values given in seconds (NaN when there are none)."""
    keys = ["mean", "median", "std", "min", "max", *(percentile_key(p) for p in percentiles)]
    if len(values_s) == 0:
        return {k: math.nan for k in keys}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {
        "mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std()),
        "min": float(ms.min()), "max": float(ms.max()),
    }
    for p in percentiles:
        out[percentile_key(p)] = float(np.percentile(ms, p))
    return out


def slo_checks(result: RequestResult, slos_ms: dict[str, float]) -> dict[str, bool]:
    """Which SLOs one request met (a failed request meets none)."""
    checks: dict[str, bool] = {}
    for metric, limit_ms in slos_ms.items():
        if not result.success:
            checks[metric] = False
        elif metric == "ttft":
            checks[metric] = result.ttft_s * 1000.0 <= limit_ms
        elif metric == "tpot":
            tpot = result.tpot_s
            checks[metric] = tpot is None or tpot * 1000.0 <= limit_ms
        else:
            checks[metric] = result.e2e_s * 1000.0 <= limit_ms
    return checks


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    slos_ms: dict[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The run's summary: counts, throughput, latency distributions, goodput and attainment."""
    slos_ms = dict(slos_ms or {})
    ok = [r for r in results if r.success]
    n_out = sum(r.output_tokens for r in ok)
    n_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "requested_output_tokens": sum(r.output_len for r in ok),
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
        "ttft_ms": distribution([r.ttft_s for r in ok], percentiles),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot_s) is not None], percentiles),
        "itl_ms": distribution([g for r in ok for g in r.itl_s], percentiles),
        "e2e_ms": distribution([r.e2e_s for r in ok], percentiles),
        "percentiles": list(percentiles),
        "errors": _error_counts(results),
    }
    if slos_ms:
        checks = [slo_checks(r, slos_ms) for r in results]
        good = sum(1 for r, c in zip(results, checks) if r.success and all(c.values()))
        n = max(len(results), 1)
        attainment = {m: sum(c[m] for c in checks) / n for m in slos_ms}
        attainment["all"] = good / n
        summary["goodput"] = {
            "slos_ms": slos_ms,
            "good_requests": good,
            "request_goodput": per_s(good),
            "attainment": attainment,
        }
    return summary


def _error_counts(results: Sequence[RequestResult], width: int = 120) -> dict[str, int]:
    """Failed requests grouped by (the start of) their error message."""
    counts: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = r.error[:width] or "unknown error"
            counts[key] = counts.get(key, 0) + 1
    return counts
