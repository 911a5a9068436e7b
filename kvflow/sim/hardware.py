"""Accelerators the planner can place instances on: datasheet peaks, links, power and price.

The planner must size GPU clusters this project cannot measure, so GPU entries hold public
specifications (the analytical model turns them into latency with achievable-fraction
efficiencies); the machine kvflow runs on joins the catalogue through `from_measurement` with
the rates `kvflow.bench.limits.measure_limits` reports. Prices drift and differ by provider and
contract, so any entry can be overridden from a JSON file (`load_catalogue`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One device (a GPU, or a whole CPU machine) and the links between devices of a cluster."""

    name: str
    kind: str  # "gpu" or "cpu"
    memory_bytes: float  # device memory (HBM, or the CPU machine's RAM)
    peak_flops: float  # dense bf16 FLOP/s (no 2:4 sparsity)
    mem_bandwidth: float  # bytes/s of device memory
    power_w: float  # board power (TDP) per device
    price_per_hour: float  # $ per device-hour
    intra_node_bandwidth: float  # bytes/s per direction between two devices of a node (NVLink); 0: none
    inter_node_bandwidth: float  # bytes/s per device to another node (InfiniBand/Ethernet); 0: none
    devices_per_node: int
    cores: int = 0  # compute units: SMs of a GPU, cores of a CPU (informative)

    def __post_init__(self) -> None:
        if self.kind not in ("gpu", "cpu"):
            raise ValueError(f"kind must be 'gpu' or 'cpu', got {self.kind!r}")
        for field in ("memory_bytes", "peak_flops", "mem_bandwidth", "devices_per_node"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")
        for field in ("power_w", "price_per_hour", "intra_node_bandwidth", "inter_node_bandwidth", "cores"):
            if getattr(self, field) < 0:
                raise ValueError(f"{self.name}: {field} must not be negative, got {getattr(self, field)}")

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which a kernel is compute-bound on this device."""
        return self.peak_flops / self.mem_bandwidth

    @classmethod
    def from_measurement(cls, name: str, flops: float, bandwidth: float, memory: float, power: float,
                         price: float, cores: int, network_bandwidth: float = 0.0) -> Hardware:
        """A CPU machine from measured rates (FLOP/s, bytes/s: `bf16_gflops·1e9`, `mem_bw_gbs·1e9`).

        One device per node with no intra-node link, so only tp = pp = 1 fits unless
        `network_bandwidth` (bytes/s to another machine) lets pipeline stages span machines.
        """
        return cls(name, "cpu", float(memory), float(flops), float(bandwidth), float(power), float(price),
                   0.0, float(network_bandwidth), 1, int(cores))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Hardware:
        known = {f.name for f in fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown hardware fields {sorted(unknown)}; known: {sorted(known)}")
        missing = {f.name for f in fields(cls) if f.name != "cores"} - set(doc)
        if missing:
            raise ValueError(f"hardware {doc.get('name', '?')!r} lacks fields {sorted(missing)}")
        return cls(**doc)


CATALOGUE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware(
            name="A100-80GB-SXM",
            kind="gpu",
            memory_bytes=80 * GIB,  # nvidia-smi reports 81920 MiB
            peak_flops=312e12,  # A100 datasheet: BF16 tensor core, dense
            mem_bandwidth=2.039e12,  # A100 80GB SXM datasheet: HBM2e 2,039 GB/s
            power_w=400.0,  # SXM4 TDP
            # AWS p4de.24xlarge (8× A100 80GB) on-demand us-east-1, $40.96/h list price as of 2024
            # (before AWS's mid-2025 GPU price cuts) ÷ 8 GPUs.
            price_per_hour=40.96 / 8,
            intra_node_bandwidth=300 * GB,  # NVLink3: 600 GB/s bidirectional per GPU
            # DGX A100: one 200 Gb/s HDR InfiniBand HCA per GPU (AWS p4de has 400 Gb/s EFA per node,
            # i.e. 6.25 GB/s per GPU: override for that case).
            inter_node_bandwidth=25 * GB,
            devices_per_node=8,
            cores=108,
        ),
        Hardware(
            name="H100-80GB-SXM",
            kind="gpu",
            memory_bytes=80 * GIB,
            peak_flops=989e12,  # H100 SXM datasheet: BF16 tensor core 1,979 TFLOP/s with sparsity, 989 dense
            mem_bandwidth=3.35e12,  # H100 SXM datasheet: HBM3 3.35 TB/s
            power_w=700.0,  # SXM5 TDP
            # AWS p5.48xlarge (8× H100 SXM) on-demand us-east-1, $98.32/h list price as of 2024
            # (before AWS's mid-2025 GPU price cuts) ÷ 8 GPUs.
            price_per_hour=98.32 / 8,
            intra_node_bandwidth=450 * GB,  # NVLink4: 900 GB/s bidirectional per GPU
            inter_node_bandwidth=50 * GB,  # one 400 Gb/s NDR HCA per GPU (DGX H100; p5: 3200 Gb/s EFA / 8)
            devices_per_node=8,
            cores=132,
        ),
    )
}


def get_hardware(name: str, catalogue: dict[str, Hardware] | None = None) -> Hardware:
    """A catalogue entry by name (case-insensitive)."""
    entries = CATALOGUE if catalogue is None else catalogue
    for key, hw in entries.items():
        if key.lower() == name.lower():
            return hw
    raise ValueError(f"unknown hardware {name!r}; catalogue: {', '.join(entries)}")


def load_catalogue(path: str | os.PathLike[str]) -> dict[str, Hardware]:
    """The built-in catalogue with a JSON file's entries applied on top.

    The file maps names to fields: for a known name only the fields given change (e.g.
    `{"H100-80GB-SXM": {"price_per_hour": 2.5}}`); a new name must give every field but `cores`.
    """
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a hardware catalogue is a JSON object of name -> fields")
    merged = dict(CATALOGUE)
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {name!r} must be an object of fields")
        base = next((hw for key, hw in merged.items() if key.lower() == name.lower()), None)
        if base is None:
            merged[name] = Hardware.from_dict({**entry, "name": name})
        else:
            merged[base.name] = Hardware.from_dict({**base.to_dict(), **entry, "name": base.name})
    return merged

