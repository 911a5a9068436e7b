"""Simulated runs: the deployment a command describes, the result documents it writes (in
`kvflow bench serve`'s format, so its plots and summaries apply), and measured runs' summaries
recomputed the same way for comparison."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from kvflow.bench.serve.client import RequestResult
from kvflow.bench.serve.metrics import summarize
from kvflow.sim.profile_io import Profile
from kvflow.sim.simulator import Deployment, SimResult, TransferSpec
from kvflow.sim.workload import SimRequest


def build_deployment(prefill_profile: Profile, decode_profile: Profile | None, colocated: int, num_prefill: int,
                     num_decode: int, mode: str = "layerwise", link_bandwidth: float | None = None,
                     transfer_latency_s: float = 0.0, frontend_s: float = 0.0) -> Deployment:
    """Colocated instances of one profile, or prefill instances of one and decode instances of another."""
    if not num_prefill and not num_decode:
        return Deployment(colocated=(prefill_profile.instance_spec(),) * max(1, colocated), frontend_s=frontend_s)
    decode_profile = decode_profile or prefill_profile
    bandwidth = link_bandwidth or prefill_profile.link_bandwidth
    if not bandwidth:
        raise ValueError("the profile has no measured link bandwidth: give --link-bandwidth")
    layers = prefill_profile.extra.get("model_shape", {}).get("num_layers")
    if not layers:
        raise ValueError("the profile does not say how many layers the model has (model_shape.num_layers)")
    transfer = TransferSpec(prefill_profile.instance.kv_bytes_per_token, bandwidth, int(layers), mode,
                            transfer_latency_s)
    return Deployment(prefill=(prefill_profile.instance_spec(),) * num_prefill,
                      decode=(decode_profile.instance_spec(),) * num_decode, transfer=transfer, frontend_s=frontend_s)


def economics(sim: SimResult, cost_per_hour: float, power_w: float) -> dict[str, float]:
    """What the run cost: the deployment's $/h and W, and per 1,000 completed requests."""
    done = sum(1 for r in sim.results if r.success)
    hours = sim.duration_s / 3600
    return {"cost_per_hour": cost_per_hour, "power_w": power_w,
            "dollars_per_1k_requests": 1e3 * cost_per_hour * hours / done if done else float("nan"),
            "kwh_per_1k_requests": 1e3 * power_w * hours / 1e3 / done if done else float("nan")}


def deployment_economics(prefill: Profile, decode: Profile | None, colocated: int, num_prefill: int,
                         num_decode: int) -> tuple[float, float]:
    """$/h and W of the deployment, from its profiles' hardware."""
    if not num_prefill and not num_decode:
        n = max(1, colocated)
        return n * prefill.instance.cost_per_hour, n * prefill.instance.power_w
    decode = decode or prefill
    return (num_prefill * prefill.instance.cost_per_hour + num_decode * decode.instance.cost_per_hour,
            num_prefill * prefill.instance.power_w + num_decode * decode.instance.power_w)


def result_doc(sim: SimResult, requests: list[SimRequest], label: str, slos: dict[str, float],
               percentiles: tuple[float, ...], source: str, cost: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """A `kvflow bench serve`-style document for a simulated run."""
    return {
        "kind": "kvflow-bench-serve", "version": 1, "simulated": True, "label": label, "source": source,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "dataset": "simulated",
        "rate_label": f"{len(requests) / max(requests[-1].arrival_s, 1e-9):.2f}" if requests else "0",
        "summary": summarize(sim.results, sim.duration_s, slos, percentiles),
        "server": {"busy_share": sim.busy_share, "preemptions": sim.preemptions,
                   "kv_transfer_exposed_ms_mean": 1e3 * sum(sim.transfer_exposed_s) / len(sim.transfer_exposed_s)
                   if sim.transfer_exposed_s else None},
        "economics": economics(sim, *cost),
        "requests": [r.to_dict() for r in sim.results],
    }


def median_summary(summaries: list[Any]) -> Any:
    """Field by field, the median of several simulated summaries of the same run (numbers are
    medians; anything else is the first one's)."""
    first = summaries[0]
    if isinstance(first, dict):
        return {key: median_summary([s[key] for s in summaries if isinstance(s, dict) and key in s])
                for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        values = [float(s) for s in summaries if isinstance(s, (int, float))]
        return float(np.median(values)) if values else first
    return first


def summarize_measured(doc: dict[str, Any], slos: dict[str, float], percentiles: tuple[float, ...]) -> dict[str, Any]:
    """A measured run's summary recomputed with these SLOs and percentiles (same code as the simulated one)."""
    results = []
    for r in doc["requests"]:
        fields = {k: v for k, v in r.items() if k != "tpot_s"}
        results.append(RequestResult(**fields))
    return summarize(results, doc["summary"]["duration_s"], slos, percentiles)
