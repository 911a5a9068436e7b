"""When each request is sent: arrival offsets (seconds from the start of the run).

Real traffic is neither a fixed rate nor a burst: independent users give Poisson arrivals, and
real services are burstier still. Inter-arrival gaps are gamma distributed with shape
``burstiness`` and mean ``1 / rate``: shape 1 is exponential (a Poisson process); below 1 the
gaps' coefficient of variation (``1 / sqrt(burstiness)``) exceeds 1, so requests come in bursts;
above 1 they grow more regular. The schedule depends only on the seed, never on the server, so
two servers see the same arrival times.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:
    """Offsets (s) of ``num_requests`` arrivals: the first at 0, then gamma-distributed gaps.

    ``request_rate`` is in requests per second; ``inf`` sends everything at once (all zeros).
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if num_requests == 0:
        return np.zeros(0)
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def offered_rate(offsets: np.ndarray) -> float:
    """Requests per second that a schedule offers (``inf`` when they all arrive at once)."""
    if len(offsets) < 2:
        return math.inf
    span = float(offsets[-1] - offsets[0])
    return (len(offsets) - 1) / span if span > 0 else math.inf
