"""The latency model: fits recover known coefficients; mixed iterations add up as documented."""

from __future__ import annotations

import numpy as np
import pytest

from kvflow.sim.latency import Fit, LatencyModel, decode_features, fit_linear, prefill_features


def test_fit_recovers_coefficients_from_noisy_prefill_samples() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([2e-3, 4e-5, 3e-9])
    batches = [rng.integers(16, 2048, size=rng.integers(1, 6)).tolist() for _ in range(60)]
    features = np.array([prefill_features([(n, 0) for n in b]) for b in batches])
    seconds = features @ truth * rng.normal(1.0, 0.02, size=len(batches))
    fit = fit_linear(features, seconds)
    assert np.allclose(fit.coef, truth, rtol=0.1)
    assert fit.mape < 0.03 and fit.r2 > 0.99 and fit.num_samples == 60


def test_fit_keeps_coefficients_non_negative_and_rejects_bad_input() -> None:
    features = np.array([decode_features([100] * b) for b in range(1, 9)])
    seconds = 0.01 + 0.0 * features[:, 2]  # flat: the batch and context terms explain nothing
    fit = fit_linear(features, seconds)
    assert min(fit.coef) >= 0 and fit.coef[0] == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        fit_linear(features, -seconds)
    with pytest.raises(ValueError, match="feature matrix"):
        fit_linear(features[:, :2], seconds)


def test_chunked_prompt_costs_add_up_and_mixed_iterations_pay_the_constant_once() -> None:
    model = LatencyModel(Fit((1e-3, 1e-5, 1e-8), 0, 1, 3), Fit((2e-3, 1e-7, 1e-4), 0, 1, 3))
    whole = model.prefill_time([1024])
    # Four 256-token chunks of one prompt: same attention work, the constant paid per iteration.
    chunks = sum(model.iteration_time([(256, 256 * i)], ()) for i in range(4))
    assert chunks == pytest.approx(whole + 3 * 1e-3)
    mixed = model.iteration_time([(128, 0)], [500, 700])
    assert mixed == pytest.approx(1e-3 + 1e-5 * 128 + 1e-8 * 128**2 + 1e-7 * 1200 + 1e-4 * 2)
    assert model.decode_time([500, 700]) == pytest.approx(2e-3 + 1e-7 * 1200 + 2e-4)
    assert model.iteration_time((), ()) == 0.0
    assert LatencyModel.from_dict(model.to_dict()) == model
