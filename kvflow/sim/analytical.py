"""Latency models and instance facts for GPUs we cannot measure, derived from a roofline.

`kvflow profile` fits a `LatencyModel` to the engine's own iterations on this machine; for a GPU
cluster the planner instead samples `Roofline` over the batches a deployment will see and fits
the same DistServe form to those samples (the form is linear in its features, the roofline's
`max(compute, memory)` is not: the fit error says how much the form loses). `InstanceProfile`
carries, beside that model, what the planner weighs an instance by: devices, KV capacity, cost,
power, and how much of a pass one pipeline stage occupies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvflow.sim.hardware import Hardware
from kvflow.sim.latency import LatencyModel, decode_features, fit_linear, prefill_features
from kvflow.sim.model_shape import ModelShape
from kvflow.sim.roofline import Efficiency, Roofline

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _lengths(max_len: int) -> list[int]:
    """16, 32, ... up to max_len, and max_len itself: the prompt and context lengths sampled."""
    out = [n for n in (2**k for k in range(4, 20)) if n < max_len]
    return [*out, max_len]


def sample_batches(max_len: int, max_batch: int, max_prefill_tokens: int,
                   capacity: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prefill batches (equal prompts, Σlen within the token budget) and decode batches (equal
    contexts), all within the KV capacity: states an instance cannot reach would skew the fit."""
    if max_len < 1 or max_batch < 1:
        raise ValueError(f"max_len and max_batch must be positive, got {max_len} and {max_batch}")
    budget = max(max_prefill_tokens, max_len)
    lengths = _lengths(max_len)
    counts = [b for b in _BATCH_SIZES if b < max_batch] + [max_batch]
    prefill = [[n] * b for n in lengths for b in counts if n * b <= min(budget, capacity)]
    decode = [[c] * b for c in lengths for b in counts if c * b <= capacity]
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError(f"KV capacity of {capacity} tokens leaves too few batches to fit a latency model")
    return prefill, decode


def fit_roofline(roofline: Roofline, prefill: Sequence[Sequence[int]],
                 decode: Sequence[Sequence[int]]) -> tuple[LatencyModel, float]:
    """The latency model fitted to roofline full-pass times, and the mean stage share of a pass."""
    shares: list[float] = []

    def seconds(chunks: list[tuple[int, int]], contexts: Sequence[int]) -> float:
        cost = roofline.cost(chunks, contexts)
        shares.append(cost.stage_s / cost.pass_s)
        return cost.pass_s

    p_feat = np.array([prefill_features([(n, 0) for n in batch]) for batch in prefill])
    p_sec = np.array([seconds([(n, 0) for n in batch], ()) for batch in prefill])
    d_feat = np.array([decode_features(batch) for batch in decode])
    d_sec = np.array([seconds([], batch) for batch in decode])
    model = LatencyModel(prefill=fit_linear(p_feat, p_sec), decode=fit_linear(d_feat, d_sec))
    return model, float(np.mean(shares))


@dataclass(frozen=True)
class InstanceProfile:
    """One serving instance of a model on tp × pp devices: its latency model and what it costs."""

    model: str
    hardware: str
    tp: int
    pp: int
    num_devices: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    cost_per_hour: float  # $ for all its devices
    power_w: float  # board power of all its devices
    # Slowest stage's share of a full pass (1.0 without pipelining): with pp micro-batches in flight
    # a request still waits a full pass, but a new iteration can start every `stage_share` of one.
    stage_share: float
    latency: LatencyModel
    assumptions: dict[str, float] = field(default_factory=dict)  # efficiencies, reserve, sampled ranges

    def to_dict(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "latency"}
        return {**doc, "latency": self.latency.to_dict(), "assumptions": dict(self.assumptions)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> InstanceProfile:
        return cls(
            model=str(doc["model"]), hardware=str(doc["hardware"]), tp=int(doc["tp"]), pp=int(doc["pp"]),
            num_devices=int(doc["num_devices"]), weight_bytes=int(doc["weight_bytes"]),
            kv_bytes_per_token=int(doc["kv_bytes_per_token"]), kv_capacity_tokens=int(doc["kv_capacity_tokens"]),
            cost_per_hour=float(doc["cost_per_hour"]), power_w=float(doc["power_w"]),
            stage_share=float(doc["stage_share"]), latency=LatencyModel.from_dict(doc["latency"]),
            assumptions={str(k): float(v) for k, v in doc.get("assumptions", {}).items()},
        )


def profile_instance(shape: ModelShape, hw: Hardware, tp: int = 1, pp: int = 1,
                     efficiency: Efficiency | None = None, reserve: float = 0.1, max_len: int = 4096,
                     max_batch: int = 256, max_prefill_tokens: int = 8192) -> InstanceProfile:
    """Derive the instance's latency model from the roofline and size its KV cache.

    `reserve`: fraction of device memory kept for activations, workspace and the runtime (vLLM's
    default `gpu_memory_utilization=0.9`). `max_len`, `max_batch`, `max_prefill_tokens` bound the
    batches sampled for the fit: the model is only as good as the range it was fitted over.
    Raises ValueError when the layout is invalid or the weights do not fit.
    """
    eff = efficiency or Efficiency()
    roofline = Roofline(shape, hw, tp, pp, eff)
    capacity = roofline.kv_capacity_tokens(reserve)
    prefill, decode = sample_batches(max_len, max_batch, max_prefill_tokens, capacity)
    latency, share = fit_roofline(roofline, prefill, decode)
    n = roofline.num_devices
    return InstanceProfile(
        model=shape.name, hardware=hw.name, tp=tp, pp=pp, num_devices=n, weight_bytes=shape.weight_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token, kv_capacity_tokens=capacity,
        cost_per_hour=n * hw.price_per_hour, power_w=n * hw.power_w, stage_share=share, latency=latency,
        assumptions={**eff.to_dict(), "reserve": reserve, "max_len": float(max_len),
                     "max_batch": float(max_batch), "max_prefill_tokens": float(max_prefill_tokens)},
    )
