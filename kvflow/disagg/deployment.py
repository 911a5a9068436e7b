"""What a disaggregated deployment is made of: its instances, their roles and where they may run.

`kvflow serve --disagg` builds one from `--prefill N --decode M` (and the Ray resource flags), or
reads it from `--deployment FILE`, the JSON a placement plan writes (`kvflow plan`). Resources
and node names matter on Ray, where each instance is one bundle of a placement group; a local
deployment runs the same instances as child processes of the front.

    {"placement_strategy": "PACK",
     "instances": [{"role": "prefill", "num_cpus": 8, "num_gpus": 1, "node": "10.0.0.2"},
                   {"role": "decode", "num_cpus": 8, "num_gpus": 1}]}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvflow.config import KV_TRANSFER_ROLES

# Ray's placement-group strategies: PACK / SPREAD are preferences, STRICT_* are requirements.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class InstanceSpec:
    role: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Ray node IP this instance must run on (node affinity, e.g. a prefill and decode pair sharing
    # NVLink in DistServe's low-affinity plan); None: wherever the placement strategy puts it.
    node: str | None = None

    def __post_init__(self) -> None:
        if self.role not in KV_TRANSFER_ROLES:
            raise ValueError(f"instance role must be one of {', '.join(KV_TRANSFER_ROLES)}; got {self.role!r}")
        if self.num_cpus <= 0:
            raise ValueError(f"an instance needs num_cpus > 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")

    @property
    def threads(self) -> int:
        """Threads for the engine's CPU pool: one per whole CPU of its share."""
        return max(1, int(self.num_cpus))

    def bundle(self) -> dict[str, float]:
        """This instance's Ray placement-group bundle (`node:<ip>` is Ray's per-node resource)."""
        bundle = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            bundle["GPU"] = float(self.num_gpus)
        if self.node:
            bundle[f"node:{self.node}"] = 0.001
        return bundle


@dataclass(frozen=True)
class DeploymentSpec:
    instances: tuple[InstanceSpec, ...]
    placement_strategy: str = "PACK"
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}; "
                             f"got {self.placement_strategy!r}")
        roles = [i.role for i in self.instances]
        if "prefill" not in roles or "decode" not in roles:
            raise ValueError(f"a disaggregated deployment needs >= 1 prefill and >= 1 decode instance, "
                             f"got {roles.count('prefill')} and {roles.count('decode')}")
        counters: dict[str, int] = {}
        names = []
        for instance in self.instances:
            names.append(f"{instance.role}-{counters.get(instance.role, 0)}")
            counters[instance.role] = counters.get(instance.role, 0) + 1
        object.__setattr__(self, "names", tuple(names))

    @classmethod
    def from_counts(cls, num_prefill: int, num_decode: int, num_cpus: float = 1.0, num_gpus: float = 0.0,
                    placement_strategy: str = "PACK") -> DeploymentSpec:
        """N prefill then M decode instances, all alike."""
        roles = ["prefill"] * num_prefill + ["decode"] * num_decode
        return cls(tuple(InstanceSpec(r, num_cpus, num_gpus) for r in roles), placement_strategy)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DeploymentSpec:
        unknown = set(doc) - {"instances", "placement_strategy"}
        if unknown:
            raise ValueError(f"unknown deployment keys: {', '.join(sorted(unknown))}")
        if not isinstance(doc.get("instances"), list):
            raise ValueError("a deployment needs an 'instances' list")
        try:
            instances = tuple(InstanceSpec(**item) for item in doc["instances"])
        except TypeError as exc:
            raise ValueError(f"bad instance entry: {exc}") from None
        return cls(instances, doc.get("placement_strategy", "PACK"))

    @classmethod
    def load(cls, path: str | Path) -> DeploymentSpec:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read deployment file {path}: {exc}") from None
        return cls.from_dict(doc)

    def to_dict(self) -> dict[str, Any]:
        return {"placement_strategy": self.placement_strategy, "instances": [asdict(i) for i in self.instances]}

    @property
    def needs_nodes(self) -> bool:
        return any(i.node for i in self.instances)
