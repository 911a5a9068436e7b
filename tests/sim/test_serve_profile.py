"""`kvflow serve --step-log` and `kvflow profile --serve`: steps logged as computed, models fitted to them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from kvflow.cli import main
from kvflow.sim.latency import Fit, LatencyModel, bucket, fit_iterations, iteration_errors, learn_factors
from kvflow.sim.profile_io import load_profile
from tests.server.server_utils import ServerProcess


def test_step_log_records_each_step_as_computed(llama_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "steps.jsonl"
    server = ServerProcess(llama_dir, tmp_path / "serve.log", "--max-model-len", "256", "--step-log", str(log))
    try:
        server.wait_ready()
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "prompt": [5, 6, 7, 8, 9, 10, 11], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
    finally:
        assert server.stop() == 0
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    # The 7-token prompt (token ids: sent as they are) in one step, then three decodes over 8, 9, 10 tokens.
    assert [s["p"] for s in steps] == [[[7, 0]], [], [], []]
    assert [s["d"] for s in steps] == [[], [8], [9], [10]]
    assert all(s["s"] > 0 for s in steps) and steps == sorted(steps, key=lambda s: s["t"])


def test_joint_fit_recovers_both_models_from_mixed_steps() -> None:
    rng = np.random.default_rng(1)
    truth = LatencyModel(Fit((2e-3, 3e-5, 1e-8), 0, 1, 3), Fit((3e-3, 2e-7, 1e-4), 0, 1, 3))
    steps = []
    for _ in range(400):
        chunks = [(int(n), 0) for n in rng.integers(8, 600, size=rng.integers(0, 3))]
        contexts = [int(c) for c in rng.integers(10, 2000, size=rng.integers(0 if chunks else 1, 20))]
        steps.append((chunks, contexts, truth.iteration_time(chunks, contexts) * rng.normal(1, 0.01)))
    fitted = fit_iterations(steps)
    assert np.allclose(fitted.prefill.coef, truth.prefill.coef, rtol=0.1)
    assert np.allclose(fitted.decode.coef, truth.decode.coef, rtol=0.1)
    assert max(iteration_errors(fitted, steps).values()) < 0.02


def test_bucket_factors_correct_what_the_linear_form_cannot_bend() -> None:
    # A batch-1 fast path: decode of one sequence takes 60 % of what the line through the rest says.
    form = LatencyModel(Fit((1e-3, 1e-5, 0), 0, 1, 3), Fit((2e-3, 0, 2e-4), 0, 1, 3))
    steps = [((), [100] * b, form.decode_time([100] * b) * (0.6 if b == 1 else 1.0)) for b in (1, 2, 3, 4) * 10]
    corrected = learn_factors(form, steps)
    assert dict(corrected.decode_factors)[1] == pytest.approx(0.6)
    assert dict(corrected.decode_factors)[4] == pytest.approx(1.0)
    assert iteration_errors(corrected, steps)["decode"] < 1e-9 < iteration_errors(form, steps)["decode"]
    assert [bucket(n) for n in (1, 2, 3, 5, 1024, 1025)] == [1, 2, 4, 8, 1024, 2048]
    assert corrected.noise_sigma == pytest.approx(0.0, abs=1e-9)  # every step explained
    assert LatencyModel.from_dict(corrected.to_dict()) == corrected


def test_noise_spread_is_learned_from_the_residuals() -> None:
    rng = np.random.default_rng(3)
    form = LatencyModel(Fit((1e-3, 1e-5, 0), 0, 1, 3), Fit((2e-3, 0, 2e-4), 0, 1, 3))
    steps = [((), [100] * 4, form.decode_time([100] * 4) * float(np.exp(0.15 * rng.standard_normal())))
             for _ in range(2000)]
    assert learn_factors(form, steps).noise_sigma == pytest.approx(0.15, rel=0.08)


def test_profile_serve_command(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "served.json"
    assert main(["profile", "--serve", "--quick", "--quiet", "--model", str(llama_dir), "--out", str(out),
                 "--serve-args", "--max-model-len 512 --num-blocks 512 --max-num-batched-tokens 512"]) == 0
    profile = load_profile(out)
    assert profile.extra["calibration"]["steps"] > 50
    assert 0 <= profile.extra["frontend_s"] < 1.0
    assert profile.instance.kv_capacity_tokens == 512 * profile.engine.block_size
    assert set(profile.extra["fit"]["corrected"]) >= {"prefill", "decode"}
