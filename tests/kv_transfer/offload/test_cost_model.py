"""Load or recompute: the model's decisions against the arithmetic they stand for."""

from __future__ import annotations

import pytest

from kvflow.kv_transfer.offload.cost_model import TIER_LATENCY_S, LoadCostModel

RECORD = 1 << 20  # 1 MiB per block
BLOCK = 16


def _model(rule: str = "auto") -> LoadCostModel:
    model = LoadCostModel(RECORD, BLOCK, rule)
    model.add_tier("file", 1e9)  # 1 GB/s
    model.add_tier("host", 10e9)
    return model


def test_loads_before_any_compute_is_measured():
    model = _model()
    assert model.recompute_seconds(100) is None
    assert model.should_load({"file": 1})
    assert not model.should_load({"file": 0})


def test_decision_is_load_time_against_recompute_time():
    model = _model()
    model.observe_step(seconds=0.1, prompt_tokens=100, total_tokens=100)  # 1 ms per token
    assert model.seconds_per_token == pytest.approx(1e-3)
    for blocks in (1, 2, 8, 64):
        load = TIER_LATENCY_S["file"] + blocks * RECORD / 1e9
        recompute = blocks * BLOCK * 1e-3
        assert model.load_seconds({"file": blocks}) == pytest.approx(load)
        assert model.should_load({"file": blocks}) == (load < recompute)
    # A very slow tier is never worth it; "always" loads anyway.
    model.tiers["file"].bytes_per_s = 1e6
    assert not model.should_load({"file": 64})
    always = _model("always")
    always.observe_step(0.1, 100, 100)
    always.tiers["file"].bytes_per_s = 1e6
    assert always.should_load({"file": 64})


def test_break_even_matches_the_decision():
    model = _model()
    model.observe_step(seconds=0.0016, prompt_tokens=16, total_tokens=16)  # 0.1 ms per token
    even = model.break_even_blocks("file")
    assert even is not None
    assert model.should_load({"file": even}) and not model.should_load({"file": even - 1})


def test_observations_move_the_averages():
    model = _model()
    model.observe_step(0.1, 8, 8)  # too few prompt tokens: ignored
    assert model.seconds_per_token is None
    model.observe_step(0.1, 100, 100)
    model.observe_step(0.3, 100, 100)
    assert 1e-3 < model.seconds_per_token < 3e-3
    before = model.tiers["file"].bytes_per_s
    model.observe_load("file", 8 * RECORD, 8 * RECORD / 0.5e9 + TIER_LATENCY_S["file"])
    assert model.tiers["file"].bytes_per_s < before
    model.observe_load("file", 1000, 1.0)  # a tiny load says nothing about bandwidth
    model.observe_load("nowhere", 8 * RECORD, 1.0)  # an unknown tier is ignored
