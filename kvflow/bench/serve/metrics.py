"""From per-request timings to the numbers a serving benchmark reports.

* throughput: completed requests, output tokens and all tokens per second of the run;
* latency distributions (ms): mean, median, std, min, max and the chosen percentiles of TTFT,
  TPOT, ITL (all gaps of all requests pooled) and E2E;
* goodput: requests per second that met every SLO given with ``--goodput`` (ttft, tpot, e2e, in
  ms); a throughput that counts only useful work, since a fast server that misses its latency
  targets serves nobody. A request with one output token has no TPOT and meets any TPOT SLO.
* SLO attainment: the fraction of all requests sent (failed ones miss every SLO) meeting each SLO,
  and all of them;
* multi-turn runs: TTFT and E2E of first turns apart from later ones (a later turn's prefix is the
  session's history: whether the server still has its KV, or must recompute it, shows there and
  nowhere else), prompt tokens per turn and the sessions / turns completed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
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
    n_in = sum(prompt_tokens(r) for r in ok)
    per_s = _per_second(duration_s)
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
    if any(r.turn is not None for r in results):
        summary["multi_turn"] = multi_turn_summary(results, duration_s, percentiles)
    return summary


def prompt_tokens(result: RequestResult) -> int:
    """A request's prompt tokens: the server's count (usage) when it gave one, else the client's."""
    return result.prompt_tokens if result.prompt_tokens is not None else result.prompt_len


def _per_second(duration_s: float) -> Callable[[float], float]:
    return (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)


def multi_turn_summary(
    results: Sequence[RequestResult], duration_s: float, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, Any]:
    """Per-turn figures of a multi-turn run (records with ``session`` / ``turn``; others ignored).

    A session is completed when all its turns succeeded (the sender records the turns it never
    sent after a failure as failed). Throughputs count every successful turn, as the overall ones.
    """
    turns = [r for r in results if r.turn is not None]
    ok = [r for r in turns if r.success]
    first = [r for r in ok if r.turn == 1]
    later = [r for r in ok if r.turn is not None and r.turn >= 2]
    by_session: dict[int | None, list[RequestResult]] = {}
    for r in turns:
        by_session.setdefault(r.session, []).append(r)
    max_turn = max((r.turn for r in turns if r.turn is not None), default=0)
    by_turn = [[prompt_tokens(r) for r in ok if r.turn == t] for t in range(1, max_turn + 1)]
    n_out = sum(r.output_tokens for r in ok)
    n_in = sum(prompt_tokens(r) for r in ok)
    per_s = _per_second(duration_s)
    return {
        "sessions": len(by_session),
        "sessions_completed": sum(1 for rs in by_session.values() if all(r.success for r in rs)),
        "turns": len(turns),
        "turns_completed": len(ok),
        "ttft_ms_first_turn": distribution([r.ttft_s for r in first], percentiles),
        "ttft_ms_later_turns": distribution([r.ttft_s for r in later], percentiles),
        "e2e_ms_first_turn": distribution([r.e2e_s for r in first], percentiles),
        "e2e_ms_later_turns": distribution([r.e2e_s for r in later], percentiles),
        "output_throughput": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
        "mean_prompt_tokens": n_in / len(ok) if ok else math.nan,
        "mean_prompt_tokens_by_turn": [sum(v) / len(v) if v else math.nan for v in by_turn],
    }


def _error_counts(results: Sequence[RequestResult], width: int = 120) -> dict[str, int]:
    """Failed requests grouped by (the start of) their error message."""
    counts: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = r.error[:width] or "unknown error"
            counts[key] = counts.get(key, 0) + 1
    return counts
