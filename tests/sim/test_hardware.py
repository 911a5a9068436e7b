"""Hardware catalogue: datasheet figures, measured CPUs, JSON overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.sim.hardware import CATALOGUE, GB, GIB, Hardware, get_hardware, load_catalogue


def test_catalogue_holds_the_datasheet_figures() -> None:
    a100, h100 = get_hardware("a100-80gb-sxm"), get_hardware("H100-80GB-SXM")
    assert (a100.peak_flops, a100.mem_bandwidth, a100.power_w) == (312e12, 2.039e12, 400.0)
    assert (h100.peak_flops, h100.mem_bandwidth, h100.power_w) == (989e12, 3.35e12, 700.0)
    assert a100.memory_bytes == h100.memory_bytes == 80 * GIB
    assert (a100.intra_node_bandwidth, h100.intra_node_bandwidth) == (300 * GB, 450 * GB)
    assert (a100.inter_node_bandwidth, h100.inter_node_bandwidth) == (25 * GB, 50 * GB)
    assert a100.price_per_hour == pytest.approx(5.12) and h100.price_per_hour == pytest.approx(12.29)
    assert a100.ridge_flops_per_byte == pytest.approx(153.0, rel=0.01)
    assert h100.ridge_flops_per_byte == pytest.approx(295.2, rel=0.01)
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("TPU-v9")


def test_from_measurement_makes_a_single_device_cpu_machine() -> None:
    cpu = Hardware.from_measurement("this-cpu", flops=150e9, bandwidth=12e9, memory=16 * GIB, power=65.0,
                                    price=0.1, cores=2)
    assert (cpu.kind, cpu.devices_per_node, cpu.cores) == ("cpu", 1, 2)
    assert (cpu.peak_flops, cpu.mem_bandwidth, cpu.intra_node_bandwidth, cpu.inter_node_bandwidth) == (
        150e9, 12e9, 0.0, 0.0)
    assert Hardware.from_dict(json.loads(json.dumps(cpu.to_dict()))) == cpu
    with pytest.raises(ValueError, match="kind"):
        Hardware("x", "tpu", 1, 1, 1, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="peak_flops must be positive"):
        Hardware.from_measurement("bad", flops=0, bandwidth=1, memory=1, power=0, price=0, cores=1)


def test_load_catalogue_overrides_fields_and_adds_entries(tmp_path: Path) -> None:
    file = tmp_path / "hw.json"
    new = {k: v for k, v in CATALOGUE["A100-80GB-SXM"].to_dict().items() if k not in ("name", "cores")}
    file.write_text(json.dumps({"h100-80gb-sxm": {"price_per_hour": 2.5},
                                "A100-80GB-PCIe": {**new, "intra_node_bandwidth": 32 * GB}}))
    catalogue = load_catalogue(file)
    h100 = catalogue["H100-80GB-SXM"]
    assert h100.price_per_hour == 2.5 and h100.peak_flops == 989e12  # only the price changed
    assert CATALOGUE["H100-80GB-SXM"].price_per_hour == pytest.approx(12.29)  # built-ins untouched
    pcie = get_hardware("A100-80GB-PCIe", catalogue)
    assert pcie.intra_node_bandwidth == 32 * GB and pcie.cores == 0
    file.write_text(json.dumps({"New-GPU": {"kind": "gpu", "peak_flops": 1e15}}))
    with pytest.raises(ValueError, match="lacks fields"):
        load_catalogue(file)
    file.write_text(json.dumps({"H100-80GB-SXM": {"tflops": 1}}))
    with pytest.raises(ValueError, match="unknown hardware fields"):
        load_catalogue(file)
