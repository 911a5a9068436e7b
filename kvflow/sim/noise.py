"""Iteration-time jitter with memory: slow and fast spells, as a real machine has them.

A serving machine does not jitter independently step by step. Its step logs show that an
iteration slower than the model predicts is followed by slow ones: on this project's shared
2-core VM the correlation of log(measured / model) between consecutive steps is 0.5–0.7, and still
0.3 ten steps later (other tenants, the API process's bursts, frequency changes). Independent
jitter averages out over a request's tokens, so it predicts TPOT tails and queue build-ups that
are too small. So the log-ratio is modelled as two parts:

* a slow part, an Ornstein–Uhlenbeck process in time (spread `sigma·√memory`, e-folding time
  `tau_s`), shared by every iteration of an instance while it lasts;
* a fast part, independent per iteration (the rest of the variance).

`fit_memory` learns `memory` and `tau_s` from the residuals' autocorrelation over time lags in
the step log; `JitterProcess` draws the factor for each simulated iteration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Time lags (s) at which the residuals' autocorrelation is measured: bin edges.
LAG_EDGES_S = (0.001, 0.004, 0.012, 0.035, 0.1, 0.3, 1.0, 3.0, 10.0)
MAX_PAIR_OFFSET = 400  # steps apart: pairs beyond this are not needed for lags up to seconds


def lag_correlations(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Autocorrelation of residuals against time lag, pooled over series.

    `series`: per instance, (log residuals, step start times) in time order. Returns the lag bins'
    mean lag (s), correlation and number of pairs."""
    edges = np.asarray(LAG_EDGES_S)
    sums, counts, lags = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    total_sq, total_n = 0.0, 0
    for residuals, times in series:
        r = np.asarray(residuals, dtype=np.float64)
        t = np.asarray(times, dtype=np.float64)
        if len(r) < 3:
            continue
        r = r - r.mean()
        total_sq += float(np.sum(r * r))
        total_n += len(r)
        for k in range(1, min(MAX_PAIR_OFFSET, len(r) - 1) + 1):
            dt = t[k:] - t[:-k]
            which = np.searchsorted(edges, dt, side="right") - 1
            ok = (which >= 0) & (which < len(edges) - 1)
            if not ok.any():
                if dt.min() >= edges[-1]:
                    break
                continue
            np.add.at(sums, which[ok], (r[k:] * r[:-k])[ok])
            np.add.at(counts, which[ok], 1)
            np.add.at(lags, which[ok], dt[ok])
    variance = total_sq / total_n if total_n else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(counts > 0, sums / np.maximum(counts, 1) / max(variance, 1e-30), np.nan)
        mean_lag = np.where(counts > 0, lags / np.maximum(counts, 1), np.nan)
    return mean_lag, corr, counts


def fit_memory(series: Sequence[tuple[np.ndarray, np.ndarray]], min_pairs: int = 50) -> tuple[float, float]:
    """(memory, tau_s): the share of the residual variance that persists, and for how long —
    `corr(lag) ≈ memory · exp(-lag / tau_s)`, fitted by least squares over the lag bins (weighted
    by their pairs) on a log grid of time constants. (0, 0) when nothing persists."""
    lag, corr, counts = lag_correlations(series)
    ok = (counts >= min_pairs) & np.isfinite(corr)
    if ok.sum() < 2:
        return 0.0, 0.0
    lag, corr, weight = lag[ok], corr[ok], np.sqrt(counts[ok])
    best = (math.inf, 0.0, 0.0)
    for tau in np.geomspace(1e-3, 100.0, 121):
        shape = np.exp(-lag / tau)
        memory = float(np.clip(np.sum(weight * shape * corr) / np.sum(weight * shape * shape), 0.0, 1.0))
        loss = float(np.sum(weight * (corr - memory * shape) ** 2))
        if loss < best[0]:
            best = (loss, memory, float(tau))
    _, memory, tau = best
    return (memory, tau) if memory > 0.02 else (0.0, 0.0)


class JitterProcess:
    """One instance's jitter: `factor(now)` multiplies the model's time of an iteration starting at
    `now` (seconds, non-decreasing). The median factor is 1, so the model stays the median."""

    def __init__(self, sigma: float, memory: float, tau_s: float, rng: np.random.Generator) -> None:
        if sigma < 0 or not 0 <= memory <= 1 or tau_s < 0:
            raise ValueError(f"jitter needs sigma >= 0, memory in [0, 1], tau >= 0; got {sigma}, {memory}, {tau_s}")
        persistent = memory if tau_s > 0 else 0.0
        self.slow_sigma = sigma * math.sqrt(persistent)
        self.fast_sigma = sigma * math.sqrt(1.0 - persistent)
        self.tau_s = tau_s
        self.rng = rng
        self._slow: float | None = None
        self._last = 0.0

    def factor(self, now: float) -> float:
        log = self.fast_sigma * self.rng.standard_normal() if self.fast_sigma else 0.0
        if self.slow_sigma:
            if self._slow is None:
                self._slow = self.slow_sigma * self.rng.standard_normal()
            else:
                keep = math.exp(-max(0.0, now - self._last) / self.tau_s)
                fresh = self.slow_sigma * math.sqrt(1 - keep * keep) * self.rng.standard_normal()
                self._slow = keep * self._slow + fresh
            self._last = now
            log += self._slow
        return math.exp(log)
