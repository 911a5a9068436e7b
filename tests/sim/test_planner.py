"""The planner on a small GPU problem: options, goodput search, the choice, and its launch file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.cli import main
from kvflow.sim.goodput import Slo, max_goodput
from kvflow.sim.hardware import get_hardware
from kvflow.sim.instance import InstanceSpec
from kvflow.sim.latency import Fit, LatencyModel
from kvflow.sim.model_shape import ModelShape
from kvflow.sim.planner import (
    Layout,
    PlanContext,
    best,
    colocated_options,
    deployment_file,
    high_affinity_options,
    low_affinity_options,
)
from kvflow.sim.simulator import Deployment
from kvflow.sim.workload import poisson_requests


def test_goodput_search_finds_the_md1_rate_for_a_ttft_slo() -> None:
    # One instance, prompts of 0.1 s each computed alone: M/D/1. P(wait <= 0.1 s) >= 0.9 holds up
    # to about 45 % load; the search must land near there, and attainment must fall with rate.
    zero = Fit((0.0, 0.0, 0.0), 0, 1, 3)
    spec = InstanceSpec(LatencyModel(Fit((0.1, 0, 0), 0, 1, 3), zero), num_blocks=10_000, max_num_batched_tokens=256)
    result = max_goodput(Deployment(colocated=(spec,)), lambda rate: poisson_requests(3000, rate, 256, 1, seed=2),
                         Slo(0.2, 1.0, 0.9))
    assert 3.5 < result.rate < 5.5
    attained = [a for _, a in result.curve]
    assert attained[0] >= 0.9 and attained[-1] < attained[0]


@pytest.fixture(scope="module")
def ctx() -> PlanContext:
    hw = get_hardware("A100-80GB-SXM")
    return PlanContext(ModelShape.known("Llama-2-13B"), Slo(0.4, 0.1, 0.9),
                       lambda rate: poisson_requests(80, rate, 512, 64, 0.5, seed=1), hw, hw, gpus_per_node=2,
                       max_len=2048)


def test_planner_options_cover_every_algorithm_and_the_best_wins(ctx: PlanContext) -> None:
    colocated = colocated_options(ctx, ctx.prefill_hw, 2)
    assert {o.name for o in colocated} == {"colocated tp1pp1", "colocated tp2pp1", "colocated tp1pp2"}
    high = high_affinity_options(ctx, 2, top=1)
    assert [(o.num_prefill, o.num_decode) for o in high] == [(1, 1)]  # one device each on a 2-device unit
    low = low_affinity_options(ctx, max_pp=1)
    assert {(o.prefill, o.decode, o.num_prefill, o.num_decode) for o in low} == {(Layout(1, 1), Layout(1, 1), 1, 1)}
    options = colocated + high + low
    assert all(o.goodput.rate > 0 for o in options)
    chosen = best(options, "throughput")
    assert chosen.score("throughput") == max(o.score("throughput") for o in options)
    assert chosen.cost_per_hour == pytest.approx(chosen.devices * ctx.prefill_hw.price_per_hour)
    doc = deployment_file(high[0], units=3)
    assert doc is not None and len(doc["instances"]) == 6
    assert {i["role"] for i in doc["instances"]} == {"prefill", "decode"}
    assert deployment_file(colocated[0], 1) is None


def test_plan_command_writes_plan_deployment_and_figures(tmp_path: Path, capsys) -> None:
    assert main(["plan", "--model", "Llama-2-7B", "--hardware", "A100-80GB-SXM", "--gpus-per-node", "2",
                 "--slo-ttft", "300", "--slo-tpot", "60", "--num-prompts", "60", "--max-model-len", "2048",
                 "--algorithms", "colocated,high-affinity", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "**chosen**" in text and "plan:" in text
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["chosen"]["goodput"] > 0 and plan["options"][0]["name"] == plan["chosen"]["name"]
    assert (tmp_path / "attainment.png").stat().st_size > 0 and (tmp_path / "goodput.png").stat().st_size > 0


def test_profile_to_instance_spec_keeps_lanes_blocks_and_policy(ctx: PlanContext) -> None:
    from kvflow.sim.profile_io import EngineSettings, Profile

    profile = ctx.profile(ctx.prefill_hw, Layout(1, 2))
    assert profile is not None and profile.pp == 2
    spec = Profile(profile, EngineSettings(16, 64, 4096, False, "prefill-first")).instance_spec()
    assert spec.lanes == 2 and spec.policy == "prefill-first" and not spec.chunked_prefill
    assert spec.num_blocks == profile.kv_capacity_tokens // 16 and spec.max_num_seqs == 64
