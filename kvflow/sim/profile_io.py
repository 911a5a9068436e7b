"""Profiles on disk, and the bridge from a profile to the simulator's instance.

A measured profile (`kvflow profile`) and a derived one (`kvflow.sim.analytical`) are both an
`InstanceProfile`: latency model, KV capacity, devices, cost and power. A measured one also keeps
the engine settings it was taken with (block size, token budget, sequence slots — the simulator
must schedule as that engine did), the machine's measured rates, the loopback link bandwidth,
the fit errors and every sample.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvflow.config import EngineConfig
from kvflow.sim.analytical import InstanceProfile
from kvflow.sim.instance import InstanceSpec
from kvflow.sim.latency import LatencyModel

PROFILE_KIND = "kvflow-profile"


@dataclass(frozen=True)
class EngineSettings:
    """The scheduler settings an instance runs with (what the simulator mirrors)."""

    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    policy: str = "mixed"  # the colocated scheduler (kvflow/sim/instance.py: SCHEDULING_POLICIES)

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineSettings:
        """The settings of an engine built from `config` (so a profile never drifts from the engine's defaults)."""
        sched = config.scheduler
        return cls(config.cache.block_size, sched.max_num_seqs, sched.max_num_batched_tokens,
                   sched.enable_chunked_prefill)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Profile:
    instance: InstanceProfile
    engine: EngineSettings = field(default_factory=EngineSettings)
    link_bandwidth: float | None = None  # bytes/s between two instances of this machine (measured)
    extra: dict[str, Any] = field(default_factory=dict)  # hardware, fit errors, samples: kept as written

    def instance_spec(self) -> InstanceSpec:
        """The simulator's view of one instance of this profile."""
        bs = self.engine.block_size
        lanes = max(1, round(1 / self.instance.stage_share)) if self.instance.pp > 1 else 1
        return InstanceSpec(self.instance.latency, max(lanes, self.instance.kv_capacity_tokens // bs), bs,
                            self.engine.max_num_seqs, self.engine.max_num_batched_tokens,
                            chunked_prefill=self.engine.chunked_prefill, policy=self.engine.policy, lanes=lanes)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": PROFILE_KIND, "version": 1, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "instance": self.instance.to_dict(), "engine": self.engine.to_dict(),
                "link_bandwidth": self.link_bandwidth, **self.extra}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def describe_latency(latency: LatencyModel) -> list[str]:
    """The fitted coefficients, as `kvflow profile` prints them."""
    p, d = latency.prefill, latency.decode
    return [f"prefill: {p.coef[0] * 1e3:.3f} ms + {p.coef[1] * 1e6:.3f} us/token + {p.coef[2] * 1e9:.4f} ns/token^2 "
            f"(fit error {100 * p.mape:.1f} % over {p.num_samples} samples)",
            f"decode:  {d.coef[0] * 1e3:.3f} ms + {d.coef[1] * 1e9:.3f} ns/context token + "
            f"{d.coef[2] * 1e6:.1f} us/seq (fit error {100 * d.mape:.1f} % over {d.num_samples} samples)",
            f"jitter:  sigma {latency.noise_sigma:.3f} (log), {100 * latency.noise_memory:.0f} % of it lasting "
            f"~{latency.noise_tau_s * 1e3:.0f} ms"]


def load_profile(path: str | Path) -> Profile:
    doc = json.loads(Path(path).read_text())
    if doc.get("kind") != PROFILE_KIND:
        raise ValueError(f"{path} is not a kvflow profile (kind {doc.get('kind')!r})")
    engine = EngineSettings(**doc.get("engine", {}))
    extra = {k: v for k, v in doc.items()
             if k not in ("kind", "version", "date", "instance", "engine", "link_bandwidth")}
    return Profile(InstanceProfile.from_dict(doc["instance"]), engine, doc.get("link_bandwidth"), extra)


def loopback_bandwidth(total_bytes: int = 256 << 20, chunk: int = 4 << 20) -> float:
    """Bytes/s through a TCP connection on this host: the KV connector's link between two local
    instances (it sends raw buffers on a socket, as this does)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = 0

    def sink() -> None:
        nonlocal received
        conn, _ = server.accept()
        buf = bytearray(chunk)
        with conn:
            while received < total_bytes:
                n = conn.recv_into(buf)
                if n == 0:
                    return
                received += n

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    payload = memoryview(bytes(chunk))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        sent = 0
        while sent < total_bytes:
            conn.sendall(payload)
            sent += chunk
        thread.join()
        seconds = time.perf_counter() - start
    server.close()
    return received / seconds
