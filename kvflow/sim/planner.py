"""Placement planning: how many prefill and decode instances, with what parallelism, on what hardware.

Every candidate is judged by simulated goodput (kvflow/sim/goodput.py) on the user's workload and
SLOs, using instance latency derived from the hardware (kvflow/sim/analytical.py).

* **Colocated** baseline: one layout (tp, pp) replicated.
* **DistServe Alg. 1, high node affinity** (fast cross-node network): each phase's layout is
  chosen alone — prefill by TTFT goodput per device, decode by TPOT goodput per device — and the
  best few of each are then paired, with the prefill:decode instance ratio searched jointly on
  one unit of the cluster; KV crosses nodes at the network's bandwidth.
* **DistServe Alg. 2, low node affinity**: the prefill and decode segments of a pipeline stage
  share a node, so KV moves over NVLink; per node, k_p prefill segments of tp_p devices and k_d
  decode segments of tp_d devices (k_p·tp_p + k_d·tp_d ≤ devices per node), pp stages deep.
A unit's goodput is replicated over the cluster; the best unit per objective is the plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvflow.disagg.deployment import DeploymentSpec
from kvflow.disagg.deployment import InstanceSpec as DeployedInstance
from kvflow.sim.analytical import InstanceProfile, profile_instance
from kvflow.sim.goodput import GoodputResult, Slo, Workload, max_goodput
from kvflow.sim.hardware import Hardware
from kvflow.sim.instance import InstanceSpec
from kvflow.sim.latency import Fit, LatencyModel
from kvflow.sim.model_shape import ModelShape
from kvflow.sim.profile_io import EngineSettings, Profile
from kvflow.sim.roofline import Efficiency
from kvflow.sim.simulator import Deployment, TransferSpec

OBJECTIVES = ("throughput", "cost", "power")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp{self.tp}pp{self.pp}"


@dataclass
class Option:
    """One deployment unit the planner simulated, and what it achieved."""

    name: str
    kind: str  # colocated | high-affinity | low-affinity
    devices: int
    goodput: GoodputResult
    cost_per_hour: float
    power_w: float
    prefill: Layout | None = None
    decode: Layout | None = None
    num_prefill: int = 0
    num_decode: int = 0
    colocated: Layout | None = None
    num_colocated: int = 0
    hardware: dict[str, str] = field(default_factory=dict)

    def score(self, objective: str) -> float:
        rate = self.goodput.rate
        if objective == "cost":
            return rate / self.cost_per_hour if self.cost_per_hour else 0.0
        if objective == "power":
            return rate / (self.power_w / 1e3) if self.power_w else 0.0
        return rate / self.devices

    def to_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in dataclasses.asdict(self).items() if k != "goodput"}
        for key in ("prefill", "decode", "colocated"):
            layout = getattr(self, key)
            doc[key] = None if layout is None else {"tp": layout.tp, "pp": layout.pp}
        return {**doc, "goodput": self.goodput.rate, "attainment_curve": self.goodput.curve,
                "per_device": self.score("throughput"), "per_dollar_hour": self.score("cost"),
                "per_kw": self.score("power")}


@dataclass
class PlanContext:
    shape: ModelShape
    slo: Slo
    workload: Workload  # requests at a rate (seeded)
    prefill_hw: Hardware
    decode_hw: Hardware
    gpus_per_node: int
    engine: EngineSettings = field(default_factory=lambda: EngineSettings(16, 256, 8192, True))
    efficiency: Efficiency = field(default_factory=Efficiency)
    max_len: int = 4096
    _profiles: dict[tuple[str, Layout], InstanceProfile | None] = field(default_factory=dict)

    def profile(self, hw: Hardware, layout: Layout) -> InstanceProfile | None:
        """The instance of this layout on this hardware (None if the weights do not fit or it is invalid)."""
        key = (hw.name, layout)
        if key not in self._profiles:
            try:
                self._profiles[key] = profile_instance(
                    self.shape, hw, layout.tp, layout.pp, self.efficiency, max_len=self.max_len,
                    max_prefill_tokens=self.engine.max_num_batched_tokens)
            except ValueError:
                self._profiles[key] = None
        return self._profiles[key]

    def spec(self, profile: InstanceProfile) -> InstanceSpec:
        return Profile(profile, self.engine).instance_spec()

    def layouts(self, hw: Hardware, max_devices: int) -> list[Layout]:
        tps = [t for t in (1, 2, 4, 8, 16) if t <= min(self.gpus_per_node, max_devices)]
        out = [Layout(t, p) for t in tps for p in (1, 2, 4, 8) if t * p <= max_devices]
        return [lay for lay in out if self.profile(hw, lay) is not None]


def _ideal_spec(blocks: int) -> InstanceSpec:
    """An instance that takes no time and never runs out of blocks: the other phase, when one is judged alone."""
    zero = Fit((0.0, 0.0, 0.0), 0.0, 1.0, 0)
    return InstanceSpec(LatencyModel(zero, zero), blocks, 16, 1 << 20, 1 << 30)


def phase_goodput(ctx: PlanContext, role: str, hw: Hardware, layout: Layout) -> GoodputResult:
    """Goodput of one prefill instance (TTFT SLO only) or one decode instance (TPOT SLO only)."""
    profile = ctx.profile(hw, layout)
    assert profile is not None
    spec = ctx.spec(profile)
    if role == "prefill":
        slo = Slo(ctx.slo.ttft_s, 1e9, ctx.slo.target)

        def workload(rate: float) -> list:  # prefill only: one output token
            return [dataclasses.replace(r, output_len=1) for r in ctx.workload(rate)]

        return max_goodput(Deployment(colocated=(spec,)), workload, slo)
    transfer = TransferSpec(profile.kv_bytes_per_token, 1e18, ctx.shape.num_layers)
    deployment = Deployment(prefill=(_ideal_spec(1 << 30),), decode=(spec,), transfer=transfer)
    return max_goodput(deployment, ctx.workload, Slo(1e9, ctx.slo.tpot_s, ctx.slo.target))


def _option(ctx: PlanContext, name: str, kind: str, deployment: Deployment, parts: list[tuple[Hardware, Layout, int]],
            **fields: Any) -> Option:
    devices = sum(layout.devices * n for _, layout, n in parts)
    cost = sum(hw.price_per_hour * layout.devices * n for hw, layout, n in parts)
    power = sum(hw.power_w * layout.devices * n for hw, layout, n in parts)
    goodput = max_goodput(deployment, ctx.workload, ctx.slo)
    return Option(name, kind, devices, goodput, cost, power, **fields)


def colocated_options(ctx: PlanContext, hw: Hardware, max_devices: int) -> list[Option]:
    options = []
    for layout in ctx.layouts(hw, max_devices):
        profile = ctx.profile(hw, layout)
        assert profile is not None
        deployment = Deployment(colocated=(ctx.spec(profile),))
        options.append(_option(ctx, f"colocated {layout}", "colocated", deployment, [(hw, layout, 1)],
                               colocated=layout, num_colocated=1, hardware={"colocated": hw.name}))
    return options


def disaggregated_option(ctx: PlanContext, kind: str, prefill: Layout, num_prefill: int, decode: Layout,
                         num_decode: int, bandwidth: float) -> Option:
    pp, dp = ctx.profile(ctx.prefill_hw, prefill), ctx.profile(ctx.decode_hw, decode)
    assert pp is not None and dp is not None
    transfer = TransferSpec(pp.kv_bytes_per_token, bandwidth, ctx.shape.num_layers, "layerwise", 1e-4)
    deployment = Deployment(prefill=(ctx.spec(pp),) * num_prefill, decode=(ctx.spec(dp),) * num_decode,
                            transfer=transfer)
    name = f"{kind} P {prefill} x{num_prefill} + D {decode} x{num_decode}"
    return _option(ctx, name, kind, deployment,
                   [(ctx.prefill_hw, prefill, num_prefill), (ctx.decode_hw, decode, num_decode)],
                   prefill=prefill, decode=decode, num_prefill=num_prefill, num_decode=num_decode,
                   hardware={"prefill": ctx.prefill_hw.name, "decode": ctx.decode_hw.name})


def high_affinity_options(ctx: PlanContext, unit_devices: int, top: int = 2) -> list[Option]:
    """Alg. 1: best layouts per phase alone, then the pairs and instance ratios within one unit."""
    ranked: dict[str, list[Layout]] = {}
    for role, hw in (("prefill", ctx.prefill_hw), ("decode", ctx.decode_hw)):
        scored = [(phase_goodput(ctx, role, hw, lay).rate / lay.devices, lay) for lay in ctx.layouts(hw, unit_devices)]
        ranked[role] = [lay for _, lay in sorted(scored, key=lambda x: -x[0])[:top]]
    options = []
    for prefill in ranked["prefill"]:
        for decode in ranked["decode"]:
            # Cross-node KV: every device of the prefill instance sends its shard on its own link.
            bandwidth = ctx.prefill_hw.inter_node_bandwidth * ctx.efficiency.link * prefill.tp
            budget = max(unit_devices, prefill.devices + decode.devices)  # at least one of each
            for num_prefill in range(1, budget // prefill.devices + 1):
                num_decode = (budget - num_prefill * prefill.devices) // decode.devices
                if num_decode >= 1:
                    options.append(disaggregated_option(ctx, "high-affinity", prefill, num_prefill, decode,
                                                        num_decode, bandwidth))
    return options


def low_affinity_options(ctx: PlanContext, max_pp: int = 4) -> list[Option]:
    """Alg. 2: per node, k_p prefill segments (tp_p) and k_d decode segments (tp_d) of the same
    pipeline stage; pp nodes deep; KV over NVLink."""
    m = ctx.gpus_per_node
    options = []
    for pp in (p for p in (1, 2, 4, 8) if p <= max_pp):
        for tp_p in (t for t in (1, 2, 4, 8) if t < m):
            for tp_d in (t for t in (1, 2, 4, 8) if t <= m - tp_p):
                prefill, decode = Layout(tp_p, pp), Layout(tp_d, pp)
                if ctx.profile(ctx.prefill_hw, prefill) is None or ctx.profile(ctx.decode_hw, decode) is None:
                    continue
                for k_p in range(1, (m - tp_d) // tp_p + 1):
                    k_d = (m - k_p * tp_p) // tp_d
                    bandwidth = ctx.prefill_hw.intra_node_bandwidth * ctx.efficiency.link * tp_p
                    options.append(disaggregated_option(ctx, "low-affinity", prefill, k_p, decode, k_d, bandwidth))
    return options


def best(options: list[Option], objective: str) -> Option:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not options:
        raise ValueError("no deployment fits: the model's weights do not fit the devices allowed")
    return max(options, key=lambda o: o.score(objective))


ALGORITHMS = ("colocated", "high-affinity", "low-affinity")


def plan(ctx: PlanContext, nodes: int, algorithms: tuple[str, ...], objective: str,
         phase_candidates: int = 2) -> tuple[Option, list[Option]]:
    """Simulate the candidate units; return the best by `objective` and all of them."""
    unit = ctx.gpus_per_node
    options: list[Option] = []
    if "colocated" in algorithms:
        options += colocated_options(ctx, ctx.prefill_hw, unit)
    if "high-affinity" in algorithms:
        options += high_affinity_options(ctx, unit, top=phase_candidates)
    # Low affinity shares a node between the phases, so it needs one kind of device.
    if "low-affinity" in algorithms and ctx.prefill_hw == ctx.decode_hw:
        options += low_affinity_options(ctx, max_pp=nodes)
    return best(options, objective), options


def deployment_file(option: Option, units: int, cpus_per_instance: float = 8.0) -> dict[str, Any] | None:
    """The chosen plan as `kvflow serve --deployment` JSON (None for a colocated plan)."""
    if option.prefill is None or option.decode is None:
        return None
    unit = ([DeployedInstance("prefill", cpus_per_instance, option.prefill.devices)] * option.num_prefill
            + [DeployedInstance("decode", cpus_per_instance, option.decode.devices)] * option.num_decode)
    # Low affinity: a unit's prefill and decode segments must share nodes (KV over NVLink).
    strategy = "STRICT_PACK" if option.kind == "low-affinity" and units == 1 else "PACK"
    return DeploymentSpec(tuple(unit * units), strategy).to_dict()
