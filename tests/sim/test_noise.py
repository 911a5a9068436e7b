"""Iteration jitter with memory: drawn as an Ornstein–Uhlenbeck process, and learned back from a log."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvflow.sim.instance import InstanceSpec
from kvflow.sim.latency import Fit, LatencyModel
from kvflow.sim.noise import JitterProcess, fit_memory, lag_correlations
from kvflow.sim.simulator import Deployment, Simulator
from kvflow.sim.workload import SimRequest


def draw(sigma: float, memory: float, tau: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Log factors of `n` iterations starting 5–15 ms apart, and their start times."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.uniform(0.005, 0.015, size=n))
    process = JitterProcess(sigma, memory, tau, np.random.default_rng(seed + 1))
    return np.log([process.factor(float(t)) for t in times]), times


def test_memoryless_jitter_is_independent_with_the_given_spread() -> None:
    logs, _ = draw(0.2, 0.0, 0.0, 20000, seed=0)
    assert logs.std() == pytest.approx(0.2, rel=0.03)
    assert abs(np.median(logs)) < 0.01  # the model stays the median
    assert abs(np.corrcoef(logs[:-1], logs[1:])[0, 1]) < 0.03


def test_persistent_jitter_keeps_the_spread_and_decays_with_the_time_constant() -> None:
    logs, times = draw(0.2, 0.6, 0.1, 40000, seed=1)
    assert logs.std() == pytest.approx(0.2, rel=0.05)
    lag, corr, counts = lag_correlations([(logs, times)])
    # Steps ~10 ms apart: the correlation at lag L is memory · exp(-L / tau).
    for mean_lag, c, n in zip(lag, corr, counts):
        if n > 2000 and 0.004 < mean_lag < 0.5:
            assert c == pytest.approx(0.6 * np.exp(-mean_lag / 0.1), abs=0.05)


def test_fit_memory_recovers_what_the_process_drew() -> None:
    series = [draw(0.2, 0.5, 0.2, 15000, seed=s) for s in (2, 3)]  # two instances, pooled
    memory, tau = fit_memory(series)
    assert memory == pytest.approx(0.5, abs=0.08)
    assert tau == pytest.approx(0.2, rel=0.35)
    assert fit_memory([draw(0.2, 0.0, 0.0, 15000, seed=4)]) == (0.0, 0.0)
    assert fit_memory([(np.zeros(2), np.zeros(2))]) == (0.0, 0.0)  # too little to say


def test_invalid_jitter_is_refused() -> None:
    rng = np.random.default_rng(0)
    for args in ((-0.1, 0.0, 0.0), (0.1, 1.5, 0.1), (0.1, 0.5, -1.0)):
        with pytest.raises(ValueError, match="jitter"):
            JitterProcess(*args, rng)


def test_persistent_jitter_spreads_requests_apart_where_independent_jitter_averages_out() -> None:
    """A request's TPOT is a mean over its iterations: independent jitter cancels in it, slow spells
    do not. That is what the memory is for (TPOT tails of real runs)."""
    lat = LatencyModel(Fit((0.01, 0, 0), 0, 1, 3), Fit((0.005, 0, 0), 0, 1, 3), noise_sigma=0.2)
    requests = [SimRequest(0.5 * i, 16, 40) for i in range(200)]  # one at a time, 40 tokens each

    def tpot_spread(memory: float, tau: float) -> float:
        spec = InstanceSpec(dataclasses.replace(lat, noise_memory=memory, noise_tau_s=tau), num_blocks=1000)
        tpots = [r.tpot_s for r in Simulator(Deployment(colocated=(spec,)), seed=0).run(requests).results]
        return float(np.std(np.log(tpots)))

    independent, persistent = tpot_spread(0.0, 0.0), tpot_spread(0.8, 1.0)
    assert independent == pytest.approx(0.2 / np.sqrt(39), rel=0.3)
    assert persistent > 3 * independent


def test_latency_model_round_trips_its_jitter_and_reads_older_profiles() -> None:
    lat = LatencyModel(Fit((1, 2, 3), 0.1, 0.9, 5), Fit((4, 5, 6), 0.1, 0.9, 5), noise_sigma=0.2,
                       noise_memory=0.4, noise_tau_s=0.15)
    assert LatencyModel.from_dict(lat.to_dict()) == lat
    older = {k: v for k, v in lat.to_dict().items() if k not in ("noise_memory", "noise_tau_s")}
    assert LatencyModel.from_dict(older) == dataclasses.replace(lat, noise_memory=0.0, noise_tau_s=0.0)
