"""The limits of a small box for one benchmark process, and what it used under them.

* **Cores**: the child is pinned (``sched_setaffinity``) to the first N CPUs this process may use,
  and told to run N threads.
* **Memory**: a memory cgroup of its own where one can be made (v1 ``memory.limit_in_bytes``, or v2
  ``memory.max`` with swap off), under this process's own cgroup, so the kernel reclaims and, past
  the limit, kills exactly as on a box with that much RAM; otherwise an RSS watchdog that samples the
  child's process tree every ``interval`` seconds and kills it the moment its resident memory passes
  the limit. Which one ran is part of every result.
* **Energy**: RAPL package counters (``/sys/class/powercap/intel-rapl:*``, AMD's too) where they are
  readable; otherwise the caller labels an estimate.

Standard library only.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvflow.bench.peers.worker import tree_pids

CGROUP_ROOT = Path("/sys/fs/cgroup")
POWERCAP = Path("/sys/class/powercap")
MEMORY_LIMITERS = ("auto", "cgroup", "watchdog")


def pick_cpus(cores: int, allowed: set[int] | None = None) -> list[int]:
    """The first `cores` CPUs this process may run on; ValueError when there are fewer."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    if cores < 1 or cores > len(allowed):
        raise ValueError(f"a limit of {cores} cores needs that many CPUs; this process may use {len(allowed)}")
    return sorted(allowed)[:cores]


# ------------------------------------------------------------------------------------------ process trees
def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root`'s process tree now (sum of VmRSS)."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0) * 1024
        except (OSError, ValueError):
            continue
    return total


def kill_tree(root: int) -> None:
    """SIGKILL `root` and its descendants (children first)."""
    for pid in reversed(tree_pids(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------ memory
class MemoryLimit:
    """How a memory limit is enforced on one child; `method` says which way."""

    method = "none"

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = int(limit_bytes)

    def join(self) -> None:
        """Run in the child before it execs (preexec_fn): enter the limit."""

    def peak_bytes(self) -> int | None:
        """The limit's own peak usage (a cgroup counts page cache too); None where it keeps none."""
        return None

    def killed(self) -> bool:
        """Whether the limit killed the child."""
        return False

    def close(self) -> None:
        """Remove what was made for the child (after it exited)."""


class CgroupMemoryLimit(MemoryLimit):
    """A memory cgroup made for the child under this process's own (v1 or v2)."""

    def __init__(self, limit_bytes: int, directory: Path, version: int) -> None:
        super().__init__(limit_bytes)
        self.directory, self.version = directory, version
        self.method = f"cgroup v{version} ({directory})"

    @classmethod
    def create(cls, limit_bytes: int, name: str, root: Path = CGROUP_ROOT,
               proc_cgroup: str | None = None) -> CgroupMemoryLimit:
        """Make the cgroup; OSError (or ValueError) where this process cannot."""
        text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
        lines = [ln.split(":", 2) for ln in text.splitlines() if ln.count(":") >= 2]
        v1 = next((path for _, controllers, path in lines if "memory" in controllers.split(",")), None)
        if v1 is not None and (root / "memory").is_dir():
            base, version = root / "memory" / v1.lstrip("/"), 1
        else:
            v2 = next((path for hid, controllers, path in lines if hid == "0" and controllers == ""), None)
            if v2 is None or not (root / "cgroup.controllers").exists():
                raise OSError("no memory cgroup hierarchy")
            base, version = root / v2.lstrip("/"), 2
            if "memory" not in (base / "cgroup.subtree_control").read_text().split():
                raise OSError(f"the memory controller is not enabled for children of {base}")
        directory = base / name
        directory.mkdir()
        try:
            if version == 1:
                (directory / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
                swap = directory / "memory.memsw.limit_in_bytes"
                if swap.exists():  # RAM + swap at the same limit: no swapping past it
                    swap.write_text(str(int(limit_bytes)))
                if (directory / "memory.swappiness").exists():
                    (directory / "memory.swappiness").write_text("0")
            else:
                (directory / "memory.max").write_text(str(int(limit_bytes)))
                if (directory / "memory.swap.max").exists():
                    (directory / "memory.swap.max").write_text("0")
        except OSError:
            directory.rmdir()
            raise
        return cls(limit_bytes, directory, version)

    def join(self) -> None:
        (self.directory / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.directory / name).read_text())
        except (OSError, ValueError):
            return None

    def killed(self) -> bool:
        try:
            if self.version == 1:
                text = (self.directory / "memory.oom_control").read_text()
                return any(ln.split()[0] == "oom_kill" and int(ln.split()[1]) > 0 for ln in text.splitlines())
            text = (self.directory / "memory.events").read_text()
            return any(ln.split()[0] == "oom_kill" and int(ln.split()[1]) > 0 for ln in text.splitlines())
        except (OSError, ValueError, IndexError):
            return False

    def close(self) -> None:
        for _ in range(50):  # the kernel frees a dead group's charges shortly after the last task exits
            try:
                self.directory.rmdir()
                return
            except OSError:
                time.sleep(0.1)


class WatchdogMemoryLimit(MemoryLimit):
    """Kill the child's tree when its resident memory passes the limit (sampled by `ProcessMonitor`)."""

    method = "rss watchdog"

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(limit_bytes)
        self.fired = False

    def killed(self) -> bool:
        return self.fired


def memory_limit(limit_bytes: int, name: str, how: str = "auto") -> MemoryLimit:
    """A cgroup where one can be made (``auto``, ``cgroup``: required), else (or for ``watchdog``) the
    RSS watchdog."""
    if how not in MEMORY_LIMITERS:
        raise ValueError(f"memory limiter must be one of {', '.join(MEMORY_LIMITERS)}, got {how!r}")
    if how != "watchdog":
        try:
            return CgroupMemoryLimit.create(limit_bytes, name)
        except (OSError, ValueError) as e:
            if how == "cgroup":
                raise OSError(f"cannot make a memory cgroup for the limit: {e}") from e
    return WatchdogMemoryLimit(limit_bytes)


# ------------------------------------------------------------------------------------------ energy
@dataclass
class Rapl:
    """RAPL package energy counters (µJ, wrapping at max_energy_range_uj)."""

    domains: list[Path]

    @classmethod
    def find(cls, root: Path = POWERCAP) -> Rapl | None:
        """The readable package domains (``intel-rapl:N``, no sub-zones); None where there are none."""
        domains = []
        for path in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
            if path.name.count(":") == 1:
                try:
                    int((path / "energy_uj").read_text())
                    domains.append(path)
                except (OSError, ValueError):
                    continue
        return cls(domains) if domains else None

    def read(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def joules(self, before: list[int], after: list[int]) -> float:
        """Energy between two readings, across a counter wrap."""
        total = 0
        for d, a, b in zip(self.domains, before, after):
            delta = b - a
            if delta < 0:
                delta += int((d / "max_energy_range_uj").read_text())
            total += delta
        return total / 1e6


# ------------------------------------------------------------------------------------------ monitor
@dataclass
class ProcessMonitor:
    """Samples a child's tree (RSS; RAPL with a wall-clock time) every `interval` s until stopped; kills it
    where a watchdog limit is passed."""

    pid: int
    limit: MemoryLimit
    interval: float = 0.05
    rapl: Rapl | None = None
    peak_rss_bytes: int = 0
    energy_samples: list[tuple[float, list[int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ProcessMonitor:
        self._thread = threading.Thread(target=self._run, name="kvflow-edge-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        rss = tree_rss_bytes(self.pid)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        if isinstance(self.limit, WatchdogMemoryLimit) and rss > self.limit.limit_bytes and not self.limit.fired:
            self.limit.fired = True
            kill_tree(self.pid)
        if self.rapl is not None:
            try:
                self.energy_samples.append((time.time(), self.rapl.read()))
            except OSError:
                self.rapl = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def energy_between(self, t0: float, t1: float) -> float | None:
        """RAPL joules between the samples nearest wall-clock times t0 and t1; None without RAPL."""
        if self.rapl is None or len(self.energy_samples) < 2:
            return None

        def nearest(t: float) -> list[int]:
            return min(self.energy_samples, key=lambda s: abs(s[0] - t))[1]

        return self.rapl.joules(nearest(t0), nearest(t1))


def child_setup(cpus: list[int], limit: MemoryLimit) -> Callable[[], None]:
    """The preexec_fn of a limited child: enter the memory limit, then pin to `cpus`."""

    def setup() -> None:
        limit.join()
        os.sched_setaffinity(0, cpus)

    return setup
