"""The discrete-event simulator against closed forms and hand-computed timelines."""

from __future__ import annotations

import numpy as np
import pytest

from kvflow.sim.instance import InstanceSpec
from kvflow.sim.latency import Fit, LatencyModel
from kvflow.sim.simulator import Deployment, Simulator, TransferSpec
from kvflow.sim.workload import SimRequest, poisson_requests


def model(prefill=(0.0, 0.0, 0.0), decode=(0.0, 0.0, 0.0)) -> LatencyModel:
    return LatencyModel(Fit(prefill, 0, 1, 3), Fit(decode, 0, 1, 3))


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_single_prefill_instance_matches_the_md1_closed_form(load: float) -> None:
    # DistServe's analysis: one prefill instance, Poisson arrivals, every prompt taking D seconds
    # and computed alone: mean TTFT = D + λD² / (2(1 − λD)).
    service = 0.1
    rate = load / service
    spec = InstanceSpec(model(prefill=(service, 0, 0)), num_blocks=10_000, max_num_batched_tokens=512)
    requests = poisson_requests(40_000, rate, 512, 1, seed=3)
    result = Simulator(Deployment(colocated=(spec,))).run(requests)
    ttft = np.mean([r.ttft_s for r in result.results])
    expected = service + rate * service**2 / (2 * (1 - load))
    assert ttft == pytest.approx(expected, rel=0.03)
    assert result.busy_share["colocated-0"] == pytest.approx(load, rel=0.03)


def test_lone_request_timeline_colocated() -> None:
    spec = InstanceSpec(model(prefill=(0.01, 1e-4, 0), decode=(0.005, 0, 0)), num_blocks=100)
    result = Simulator(Deployment(colocated=(spec,), frontend_s=0.002)).run([SimRequest(1.0, 100, 4)])
    r = result.results[0]
    assert r.success and r.output_tokens == 4
    assert r.ttft_s == pytest.approx(0.01 + 100 * 1e-4 + 0.002)
    assert r.itl_s == pytest.approx([0.005] * 3)


def disaggregated(mode: str, bandwidth: float = 1e6, decode_blocks: int = 100) -> Deployment:
    prefill = InstanceSpec(model(prefill=(0.0, 1e-3, 0)), num_blocks=100)
    decode = InstanceSpec(model(decode=(0.004, 0, 0)), num_blocks=decode_blocks)
    transfer = TransferSpec(kv_bytes_per_token=1000, bandwidth=bandwidth, num_layers=4, mode=mode, latency_s=0.001)
    return Deployment(prefill=(prefill,), decode=(decode,), transfer=transfer)


def test_disaggregated_timeline_whole_and_layerwise() -> None:
    # 100-token prompt: prefill 0.1 s; 100 kB over 1 MB/s = 0.1 s; then one decode iteration
    # emits the first token (and the second).
    whole = Simulator(disaggregated("whole")).run([SimRequest(0.0, 100, 3)])
    r = whole.results[0]
    assert r.ttft_s == pytest.approx(0.1 + 0.1 + 0.001 + 0.004)
    assert r.itl_s == pytest.approx([0.0, 0.004])
    assert whole.transfer_exposed_s == pytest.approx([0.101])
    # Layer-wise: layer i is ready at (i+1)/4 of the prefill and takes 0.025 s to send, so the
    # last one leaves 0.025 s after the prompt is done.
    layerwise = Simulator(disaggregated("layerwise")).run([SimRequest(0.0, 100, 3)])
    assert layerwise.results[0].ttft_s == pytest.approx(0.1 + 0.025 + 0.001 + 0.004)
    assert layerwise.transfer_exposed_s == pytest.approx([0.026])


def test_decode_admission_queues_at_the_prefill_side_and_gives_every_block_back() -> None:
    # The decode instance holds two requests' blocks at a time; ten arrive at once.
    deployment = disaggregated("whole", bandwidth=1e9, decode_blocks=2 * 8)  # prompt + 20 tokens: 8 blocks each
    sim = Simulator(deployment)
    requests = [SimRequest(0.0, 100, 20) for _ in range(10)]
    result = sim.run(requests)
    assert all(r.success for r in result.results)
    # The first prompt runs alone (0.1 s), the other nine together (0.9 s); their decodes then go
    # two at a time. A pair takes 20 iterations of 4 ms: one emitting tokens 1 and 2, 18 more,
    # and the one during which the previous pair's blocks come back and the next KV lands.
    spans = sorted((r.ttft_s, r.e2e_s) for r in result.results)
    assert all(sum(a < end and start < b for a, b in spans) <= 2 for start, end in spans)
    assert spans[-1][0] - spans[1][0] == pytest.approx(4 * 20 * 0.004)
    for instance in sim.prefill + sim.decode:
        assert instance.free_blocks == instance.spec.num_blocks and not instance.held


def test_preemption_when_blocks_run_out_recomputes_and_finishes() -> None:
    spec = InstanceSpec(model(prefill=(0.001, 1e-5, 0), decode=(0.002, 0, 0)), num_blocks=12, block_size=16)
    sim = Simulator(Deployment(colocated=(spec,)))
    result = sim.run([SimRequest(0.0, 60, 60) for _ in range(3)])
    assert all(r.success and r.output_tokens == 60 for r in result.results)
    assert result.preemptions > 0
    assert sim.colocated[0].free_blocks == 12


def test_bad_deployments_are_refused() -> None:
    spec = InstanceSpec(model(), num_blocks=10)
    with pytest.raises(ValueError, match="either colocated"):
        Deployment()
    with pytest.raises(ValueError, match="transfer"):
        Deployment(prefill=(spec,), decode=(spec,))
    with pytest.raises(ValueError, match="lanes"):
        InstanceSpec(model(), num_blocks=10, lanes=0)


def test_prefill_first_stalls_decodes_where_mixed_batches_them() -> None:
    # A decoding request, then a 100-token prompt arriving mid-stream.
    lat = model(prefill=(0.01, 1e-4, 0), decode=(0.005, 0, 0))
    requests = [SimRequest(0.0, 10, 20), SimRequest(0.0501, 100, 2)]
    gaps = {}
    for policy in ("mixed", "prefill-first"):
        spec = InstanceSpec(lat, num_blocks=100, policy=policy)
        first = Simulator(Deployment(colocated=(spec,))).run(requests).results[0]
        gaps[policy] = max(first.itl_s)
    # Mixed: the decode rides along in the prompt's iteration (0.02 s). Prefill-first: it waits
    # for the prompt-only iteration (0.02 s), then takes its own (0.005 s).
    assert gaps["mixed"] == pytest.approx(0.02)
    assert gaps["prefill-first"] == pytest.approx(0.025)
    with pytest.raises(ValueError, match="policy"):
        InstanceSpec(lat, num_blocks=10, policy="fifo")


def test_iteration_jitter_widens_tails_keeps_medians_and_is_seeded() -> None:
    import dataclasses

    base = model(prefill=(0.05, 0, 0))
    requests = [SimRequest(float(i), 16, 1) for i in range(400)]  # far apart: no queueing

    def ttfts(sigma: float, seed: int) -> np.ndarray:
        spec = InstanceSpec(dataclasses.replace(base, noise_sigma=sigma), num_blocks=100)
        return np.array([r.ttft_s for r in Simulator(Deployment(colocated=(spec,)), seed).run(requests).results])

    flat, noisy = ttfts(0.0, 0), ttfts(0.2, 0)
    assert np.ptp(flat) == pytest.approx(0.0, abs=1e-12)
    assert np.median(noisy) == pytest.approx(0.05, rel=0.05)
    assert np.percentile(noisy, 90) / np.median(noisy) == pytest.approx(np.exp(0.2 * 1.2816), rel=0.08)
    assert np.array_equal(noisy, ttfts(0.2, 0)) and not np.array_equal(noisy, ttfts(0.2, 1))
