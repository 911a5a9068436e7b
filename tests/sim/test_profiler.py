"""`kvflow profile` on a tiny model, and `kvflow simulate` on what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvflow.cli import main
from kvflow.config import EngineConfig
from kvflow.sim.profile_io import load_profile
from kvflow.sim.profiler import ProfileGrid, Sample, fit_samples, profile_engine
from kvflow.sim.runs import build_deployment, result_doc
from kvflow.sim.simulator import Simulator
from kvflow.sim.workload import poisson_requests


def test_profile_times_the_engine_over_the_grid(llama_dir: Path) -> None:
    config = EngineConfig.create(llama_dir, dtype="float32", max_model_len=512, num_blocks=256)
    result = profile_engine(config, ProfileGrid.quick())
    prefill = [s for s in result.samples if s.kind == "prefill"]
    decode = [s for s in result.samples if s.kind == "decode"]
    mixed = [s for s in result.samples if s.kind == "mixed"]
    # Every grid point that fits the engine: 3 lengths x 2 batch sizes; 3 x 2 decode points x 3 steps.
    assert len(prefill) == 6 and len(decode) == 18 and len(mixed) == 1
    assert {len(s.chunks) for s in prefill} == {1, 4} and {len(s.contexts) for s in decode} == {1, 8, 32}
    assert all(s.seconds > 0 for s in result.samples)
    # Decode contexts grow by one token per step: the first step attends over the 32-token prompt
    # and the token sampled with it.
    first = [s for s in decode if len(s.contexts) == 8][:3]
    assert [s.contexts[0] for s in first] == [33, 34, 35]
    assert min(result.latency.prefill.coef) >= 0 and min(result.latency.decode.coef) >= 0
    assert result.mixed_mape is not None and np.isfinite(result.mixed_mape)
    assert result.num_blocks == 256


def test_fit_samples_scores_the_mixed_iterations_it_never_saw() -> None:
    samples = [Sample("prefill", [(n, 0)] * b, [], 1e-3 + 1e-5 * n * b) for n in (16, 64, 256) for b in (1, 2)]
    samples += [Sample("decode", [], [c] * b, 2e-3 + 1e-4 * b) for c in (32, 512) for b in (1, 4, 16)]
    mixed = [Sample("mixed", [(64, 0)], [100] * 4, 1e-3 + 64e-5 + 4e-4)]
    result = fit_samples(samples, mixed)
    assert result.latency.prefill.coef[1] == pytest.approx(1e-5, rel=1e-3)
    assert result.mixed_mape == pytest.approx(0.0, abs=1e-3)


def test_profile_command_then_simulate_and_replay(llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", str(llama_dir), "--dtype", "float32", "--max-model-len", "512",
                 "--num-blocks", "128", "--quick", "--quiet", "--cpu-cores", "0", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.instance.kv_capacity_tokens == 128 * profile.engine.block_size
    assert profile.link_bandwidth and profile.link_bandwidth > 1e7
    assert profile.extra["model_shape"]["num_layers"] == 2 and profile.extra["hardware"]["cpu_cores"] == [0]
    # A simulated run saved as a bench result, replayed: the replay must reproduce it exactly.
    requests = poisson_requests(40, 20.0, 64, 8, seed=1)
    deployment = build_deployment(profile, None, 0, 1, 1, link_bandwidth=1e9)
    doc = result_doc(Simulator(deployment).run(requests), requests, "disagg", {"ttft": 500, "tpot": 50},
                     (50.0, 90.0), str(out))
    run = tmp_path / "run.json"
    run.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["simulate", "--profile", str(out), "--prefill", "1", "--decode", "1", "--link-bandwidth", "1",
                 "--replay", str(run), "--percentiles", "50,90", "--out", str(tmp_path / "sims")]) == 0
    text = capsys.readouterr().out
    # Cost and power: two instances of the profile's machine ($0.10/h and 65 W each by default).
    assert "deployment: 2 instances, $0.20/h, 130 W" in text
    saved = json.loads(next((tmp_path / "sims").glob("*.json")).read_text())
    hours = saved["summary"]["duration_s"] / 3600
    assert saved["economics"]["dollars_per_1k_requests"] == pytest.approx(1e3 * 0.2 * hours / 40)
    rows = [line for line in text.splitlines() if line.startswith("| disagg")]
    measured, simulated, error = (row.split("|")[2:] for row in rows)
    assert measured == simulated
    assert error[:3] == [" +0 % / +0 % ", " +0 % / +0 % ", " +0.0 "]
