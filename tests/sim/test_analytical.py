"""Roofline-derived latency models: the physics they must respect, and the instance facts."""

from __future__ import annotations

import json

import pytest

from kvflow.sim.analytical import InstanceProfile, profile_instance, sample_batches
from kvflow.sim.hardware import CATALOGUE, GB, GIB, Hardware
from kvflow.sim.model_shape import KNOWN_SHAPES
from kvflow.sim.roofline import Efficiency, Roofline

A100, H100 = CATALOGUE["A100-80GB-SXM"], CATALOGUE["H100-80GB-SXM"]
LLAMA7, LLAMA70, OPT175 = KNOWN_SHAPES["Llama-2-7B"], KNOWN_SHAPES["Llama-2-70B"], KNOWN_SHAPES["OPT-175B"]
EFF = Efficiency()


def test_small_batch_decode_is_memory_bound_at_the_weight_read_time() -> None:
    floor = LLAMA7.weight_bytes / (A100.mem_bandwidth * EFF.bandwidth)  # 9.6 ms
    cost = Roofline(LLAMA7, A100).cost((), [512, 512])
    assert cost.memory_s > 10 * cost.compute_s
    assert cost.pass_s == pytest.approx(floor, rel=0.10)
    profile = profile_instance(LLAMA7, A100)
    assert profile.latency.decode_time([512, 512]) == pytest.approx(floor, rel=0.10)
    assert profile.latency.decode.mape < 0.10


def test_long_prefill_is_compute_bound_and_grows_as_the_roofline_says() -> None:
    roofline = Roofline(LLAMA7, A100)
    rate = A100.peak_flops * EFF.prefill_mfu

    def flops(n: int) -> float:
        return LLAMA7.linear_flops_per_token * n + LLAMA7.attention_flops(n, 0) + LLAMA7.logits_flops

    for n in (2048, 4096):
        cost = roofline.cost([(n, 0)], ())
        assert cost.compute_s > 10 * cost.memory_s
        assert cost.compute_s == pytest.approx(flops(n) / rate, rel=1e-9)
        assert cost.pass_s == pytest.approx(flops(n) / rate + EFF.overhead_s, rel=1e-9)
    # Attention makes doubling the prompt cost more than twice as much.
    ratio = roofline.prefill_s([4096]) / roofline.prefill_s([2048])
    assert ratio == pytest.approx(flops(4096) / flops(2048), rel=0.01) and ratio > 2.05
    fitted = profile_instance(LLAMA7, A100).latency
    for n in (1024, 2048, 4096):
        assert fitted.prefill_time([n]) == pytest.approx(roofline.prefill_s([n]), rel=0.06)


def test_tensor_parallelism_halves_compute_and_pays_two_all_reduces_per_layer() -> None:
    one, two = Roofline(LLAMA7, A100, tp=1).cost([(2048, 0)], ()), Roofline(LLAMA7, A100, tp=2).cost([(2048, 0)], ())
    assert two.compute_s == pytest.approx(one.compute_s / 2)
    ring = 2 * (2 - 1) / 2 * 2048 * 4096 * 2 / (300 * GB * EFF.link)  # 2(tp-1)/tp · activations / NVLink
    assert two.allreduce_s == pytest.approx(2 * 32 * (ring + EFF.collective_latency_s))
    assert one.allreduce_s == 0.0
    assert 0.5 * one.pass_s < two.pass_s < 0.6 * one.pass_s
    # Decode: each device reads half the weights.
    assert Roofline(LLAMA7, A100, tp=2).cost((), [512]).memory_s == pytest.approx(
        Roofline(LLAMA7, A100).cost((), [512]).memory_s / 2)


def test_h100_beats_a100_by_the_datasheet_ratios() -> None:
    a, h = Roofline(LLAMA70, A100, tp=4), Roofline(LLAMA70, H100, tp=4)
    compute_ratio, bandwidth_ratio = 989 / 312, 3.35 / 2.039
    assert a.prefill_s([4096]) / h.prefill_s([4096]) == pytest.approx(compute_ratio, rel=0.15)
    assert a.decode_s([1024] * 4) / h.decode_s([1024] * 4) == pytest.approx(bandwidth_ratio, rel=0.10)
    pa, ph = profile_instance(LLAMA70, A100, tp=4), profile_instance(LLAMA70, H100, tp=4)
    assert pa.latency.decode_time([1024] * 4) / ph.latency.decode_time([1024] * 4) == pytest.approx(
        bandwidth_ratio, rel=0.10)


def test_weights_that_do_not_fit_and_impossible_layouts_raise() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        profile_instance(LLAMA70, A100)  # 138 GB on one 80 GiB GPU
    with pytest.raises(ValueError, match="does not fit"):
        profile_instance(OPT175, A100, tp=4)  # 349 GB on 4 × 72 GiB usable
    assert profile_instance(OPT175, A100, tp=8).num_devices == 8  # DistServe's OPT-175B layout fits
    with pytest.raises(ValueError, match="divide"):
        Roofline(LLAMA7, A100, tp=3)
    with pytest.raises(ValueError, match="within one node"):
        Roofline(OPT175, A100, tp=16)
    with pytest.raises(ValueError, match="layers"):
        Roofline(LLAMA7, A100, pp=33)


def test_kv_capacity_by_hand() -> None:
    usable = 80 * 2**30 * 0.9  # one A100, 10 % kept for activations
    weights = 6_738_415_616 * 2
    assert Roofline(LLAMA7, A100).kv_capacity_tokens(0.1) == int((usable - weights) / 524288) == 121750
    # Llama-2-70B over tp=2, pp=2: 40 layers a stage; stage 0 also holds the embedding, stage 1 the
    # lm_head and final norm: the same bytes, so the bound is (2 devices' usable − stage weights) / stage KV.
    stage_weights = (40 * LLAMA70.params_per_layer + 32000 * 8192) * 2
    stage_kv = 40 * 2 * 8 * 128 * 2
    expected = int((2 * usable - stage_weights - 8192 * 2) / stage_kv)
    assert profile_instance(LLAMA70, A100, tp=2, pp=2).kv_capacity_tokens == expected
    # Llama-3-8B at tp=16 would need KV replication: out of an 8-GPU node anyway; tp=8 splits 8 heads.
    assert Roofline(KNOWN_SHAPES["Llama-3-8B"], A100, tp=8).kv_replication == 1.0


def test_pipeline_stages_share_the_pass_and_cross_nodes_over_the_network() -> None:
    one, two = Roofline(LLAMA70, A100, tp=4), Roofline(LLAMA70, A100, tp=4, pp=2)
    c1, c2 = one.cost([(1024, 0)], ()), two.cost([(1024, 0)], ())
    send = 1024 * 8192 * 2 / 4 / (300 * GB * EFF.link) + EFF.collective_latency_s  # 8 GPUs: one node
    assert c2.send_s == pytest.approx(send)
    assert c2.pass_s == pytest.approx(c1.pass_s + EFF.overhead_s + send, rel=0.01)
    assert c2.stage_s == pytest.approx(c2.pass_s / 2, rel=0.05)
    assert profile_instance(LLAMA70, A100, tp=4, pp=2).stage_share == pytest.approx(0.5, abs=0.03)
    assert profile_instance(LLAMA70, A100, tp=4).stage_share == 1.0
    # OPT-175B on 2 × 8 GPUs: the stage boundary is between nodes, at 25 GB/s per GPU.
    cross = Roofline(OPT175, A100, tp=8, pp=2).cost([(1024, 0)], ())
    assert cross.send_s == pytest.approx(1024 * 12288 * 2 / 8 / (25 * GB * EFF.link) + EFF.collective_latency_s)


def test_measured_cpu_machine_gets_a_profile_but_no_parallelism() -> None:
    cpu = Hardware.from_measurement("this-cpu", flops=200e9, bandwidth=15e9, memory=32 * GIB, power=65.0,
                                    price=0.08, cores=2)
    qwen = KNOWN_SHAPES["Qwen2.5-7B"]
    profile = profile_instance(qwen, cpu, max_batch=8)  # the knee is near batch 10 here: fit below it
    floor = qwen.weight_bytes / (15e9 * EFF.bandwidth)
    assert profile.latency.decode_time([256]) == pytest.approx(floor, rel=0.10)
    assert (profile.cost_per_hour, profile.power_w) == (0.08, 65.0)
    with pytest.raises(ValueError, match="link"):
        Roofline(qwen, cpu, pp=2)
    with pytest.raises(ValueError, match="within one node"):
        Roofline(qwen, cpu, tp=2)


def test_sampled_batches_stay_within_the_kv_capacity_and_the_fit_keeps_its_error() -> None:
    prefill, decode = sample_batches(max_len=2048, max_batch=64, max_prefill_tokens=4096, capacity=20000)
    assert max(sum(b) for b in prefill) <= 4096 and max(sum(b) for b in decode) <= 20000
    assert max(max(b) for b in prefill) == 2048 and max(len(b) for b in decode) == 64
    with pytest.raises(ValueError, match="too few batches"):
        sample_batches(4096, 256, 8192, capacity=20)
    profile = profile_instance(LLAMA7, H100, max_len=2048, max_batch=64, max_prefill_tokens=4096)
    assert profile.latency.prefill.num_samples == len(prefill)
    assert 0 < profile.latency.prefill.mape < 0.15 and profile.latency.prefill.r2 > 0.95


def test_instance_profile_json_round_trip() -> None:
    profile = profile_instance(OPT175, A100, tp=8, efficiency=Efficiency(prefill_mfu=0.6))
    assert profile.cost_per_hour == pytest.approx(40.96) and profile.power_w == 3200.0
    assert profile.assumptions["prefill_mfu"] == 0.6 and profile.assumptions["reserve"] == 0.1
    assert profile.weight_bytes == OPT175.weight_bytes and profile.kv_bytes_per_token == 4718592
    assert InstanceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
