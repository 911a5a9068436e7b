"""Goodput of a deployment: the highest request rate it serves with enough requests within SLO.

DistServe's definition: a deployment's goodput is the largest arrival rate at which at least
`target` (e.g. 90 %) of requests meet both the TTFT and the TPOT SLO. It is found by simulating
the same seeded workload at increasing rates and bisecting on the attainment, which falls as the
rate rises (queues grow). The attainment curve on the way is kept for plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from kvflow.bench.serve.metrics import slo_checks
from kvflow.sim.simulator import Deployment, Simulator
from kvflow.sim.workload import SimRequest


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    target: float = 0.9  # fraction of requests that must meet both

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0 or not 0 < self.target <= 1:
            raise ValueError(f"SLOs must be > 0 and the target in (0, 1], got {self}")

    @property
    def ms(self) -> dict[str, float]:
        return {"ttft": 1e3 * self.ttft_s, "tpot": 1e3 * self.tpot_s}


# Requests of a workload at a given rate (same seed at every rate: only the arrival times scale).
Workload = Callable[[float], list[SimRequest]]


def attainment(deployment: Deployment, requests: list[SimRequest], slo: Slo) -> float:
    """Fraction of requests meeting both SLOs (an unfinished request meets none)."""
    results = Simulator(deployment).run(requests).results
    good = sum(1 for r in results if r.success and all(slo_checks(r, slo.ms).values()))
    return good / max(1, len(results))


@dataclass
class GoodputResult:
    rate: float  # req/s: the highest rate found with attainment >= target (0: not even the lowest)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment), by rate


def max_goodput(deployment: Deployment, workload: Workload, slo: Slo, low: float = 0.05,
                high: float = 1e4, steps: int = 10) -> GoodputResult:
    """Bisect (in log space) for the highest rate whose attainment meets the target."""
    curve: dict[float, float] = {}

    def ok(rate: float) -> bool:
        curve[rate] = attainment(deployment, workload(rate), slo)
        return curve[rate] >= slo.target

    if not ok(low):
        return GoodputResult(0.0, sorted(curve.items()))
    # Grow until it fails, then bisect between the last pass and the first failure.
    rate = low
    while rate < high:
        nxt = rate * 4
        if not ok(nxt):
            high = nxt
            break
        rate = nxt
    else:
        return GoodputResult(rate, sorted(curve.items()))
    lo, hi = rate, high
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.02:
            break
    return GoodputResult(lo, sorted(curve.items()))
