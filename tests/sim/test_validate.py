"""The validation report of `kvflow simulate --replay`: errors, repeats, noise floor, own step logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvflow.cli import main
from kvflow.sim.analytical import InstanceProfile
from kvflow.sim.latency import Fit, LatencyModel
from kvflow.sim.profile_io import EngineSettings, Profile
from kvflow.sim.runs import build_deployment, result_doc
from kvflow.sim.simulator import Simulator
from kvflow.sim.validate import ValidationReport, errors, figures, stream_key
from kvflow.sim.workload import poisson_requests


def summary(ttft: tuple[float, float], tpot: tuple[float, float], attainment: float) -> dict:
    return {"ttft_ms": {"p50": ttft[0], "p90": ttft[1]}, "tpot_ms": {"p50": tpot[0], "p90": tpot[1]},
            "goodput": {"attainment": {"all": attainment}}}


def test_errors_are_relative_and_attainment_is_in_points() -> None:
    measured = figures(summary((100, 200), (5, 10), 0.95))
    simulated = figures(summary((110, 180), (5, 12), 0.92))
    assert errors(simulated, measured) == pytest.approx(
        {"ttft_p50": 0.10, "ttft_p90": -0.10, "tpot_p50": 0.0, "tpot_p90": 0.20, "attainment_points": -3.0})


def test_repeats_of_one_stream_give_the_noise_floor_and_a_median_comparison() -> None:
    stream = {"label": "x", "dataset": "random", "rate_label": "2.00",
              "requests": [{"arrival_s": 0.5 * i, "prompt_len": 64, "output_len": 8} for i in range(4)]}
    other = {**stream, "requests": [{**r, "arrival_s": r["arrival_s"] + 0.1} for r in stream["requests"]]}
    assert stream_key(stream) != stream_key(other)
    report = ValidationReport()
    simulated = summary((100, 200), (5, 10), 1.0)
    for ttft50 in (90, 100, 130):  # the same stream measured three times; the median is 100
        report.add("x @ 2", stream, summary((ttft50, 200), (5, 10), 1.0), simulated)
    report.add("x @ 2", other, summary((100, 200), (5, 10), 1.0), simulated)  # alone: no repeats
    lines = report.lines()
    # Each run: 13 of 16 cells are exact, 90 -> +11 %, 130 -> -23 % are not within 10 %.
    assert lines[0].startswith("each run: 14/16 percentile cells within 10 %")
    assert lines[1].startswith("median of repeats: 4/4 percentile cells within 10 %")
    # Noise floor: 90 and 130 against 100 (-10 % counts as within, +30 % does not).
    assert lines[2].startswith("noise floor (each run against the median of its repeats): 11/12 percentile cells")
    rows = [line for line in lines if line.startswith("| x @ 2")]
    assert len(rows) == 1 and rows[0].startswith("| x @ 2 (random 64/8) ×3 | 100 / 100 (+0 %, ±22)")


@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    latency = LatencyModel(Fit((0.02, 1e-5, 0.0), 0, 1, 3), Fit((0.004, 0.0, 1e-4), 0, 1, 3))
    instance = InstanceProfile(model="m", hardware="h", tp=1, pp=1, num_devices=1, weight_bytes=1,
                               kv_bytes_per_token=1024, kv_capacity_tokens=16 * 1000, cost_per_hour=0.1,
                               power_w=65.0, stage_share=1.0, latency=latency)
    path = tmp_path / "profile.json"
    Profile(instance, EngineSettings(), 1e9, {"model_shape": {"num_layers": 2}}).save(path)
    return path


def write_run(run_dir: Path, profile_path: Path, slowdown: float) -> Path:
    """A 'measured' run (simulated, `slowdown` × the profile's latency) with a step log of those steps."""
    from kvflow.sim.profile_io import load_profile

    profile = load_profile(profile_path)
    requests = poisson_requests(30, 2.0, 64, 8, seed=2)
    doc = result_doc(Simulator(build_deployment(profile, None, 1, 0, 0)).run(requests), requests, "run",
                     {"ttft": 500, "tpot": 50}, (50.0, 90.0), "x")
    run_dir.mkdir(parents=True)
    path = run_dir / "run.json"
    path.write_text(json.dumps(doc))
    lat = profile.instance.latency
    rng = np.random.default_rng(0)
    lines, t = [], 0.0
    for _ in range(300):  # prefill and decode steps of the sizes this stream has, `slowdown` × slower
        batch = int(rng.integers(1, 4))
        contexts = [int(c) for c in rng.integers(65, 80, batch)]
        chunks, contexts = ([[64, 0]], []) if rng.random() < 0.3 else ([], contexts)
        took = slowdown * lat.iteration_time([tuple(c) for c in chunks], contexts)
        lines.append(json.dumps({"t": t, "s": took, "p": chunks, "d": contexts}))
        t += took + 0.1
    (run_dir / "steps").write_text("\n".join(lines) + "\n")
    return path


def ttft_p50(text: str, kind: str) -> float:
    row = next(line for line in text.splitlines() if line.startswith("| run @") and kind in line)
    return float(row.split("|")[2].split("/")[0])


def test_own_step_logs_replace_the_profiles_latency(profile_path: Path, tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "slow", profile_path, slowdown=2.0)
    capsys.readouterr()
    assert main(["simulate", "--profile", str(profile_path), "--replay", str(run), "--percentiles", "50,90"]) == 0
    plain = capsys.readouterr().out
    assert main(["simulate", "--profile", str(profile_path), "--replay", str(run), "--percentiles", "50,90",
                 "--fit-steps", "own"]) == 0
    own = capsys.readouterr().out
    assert ttft_p50(plain, "simulated") == pytest.approx(ttft_p50(plain, "measured"), rel=1e-6)
    assert ttft_p50(own, "simulated") == pytest.approx(2 * ttft_p50(own, "measured"), rel=0.1)
    assert "each run: " in own


def test_repeats_report_the_median_draw_and_bad_options_fail(profile_path: Path, tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "r", profile_path, slowdown=1.0)
    assert main(["simulate", "--profile", str(profile_path), "--replay", str(run), str(run), "--repeats", "3",
                 "--percentiles", "50,90", "--out", str(tmp_path / "sims")]) == 0
    text = capsys.readouterr().out
    assert "median of repeats: 4/4 percentile cells within 10 %" in text  # the same stream twice
    assert json.loads(next((tmp_path / "sims").glob("*.json")).read_text())["repeats"] == 3
    (tmp_path / "empty").mkdir()
    for bad, message in ((["--replay", str(run), "--repeats", "0"], "--repeats must be >= 1"),
                         (["--fit-steps", "own", "--request-rate", "1"], "--fit-steps own needs --replay"),
                         (["--replay", str(run), "--fit-steps", str(tmp_path / "empty")], "no step logs")):
        assert main(["simulate", "--profile", str(profile_path), *bad]) == 2
        assert message in capsys.readouterr().err
