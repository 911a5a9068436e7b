"""How idle the CPUs are, from /proc/stat; standard library only.

Shared by the in-process benchmark (`kvflow.bench.throughput`) and the peer worker, which runs
under a peer's own interpreter where kvflow is not importable and so loads this file by path.
"""

from __future__ import annotations

import time


def cpu_idle_fraction(window_s: float = 1.0) -> float | None:
    """Share of all CPUs' time that was idle over ``window_s`` (from /proc/stat); None if unknown."""

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total (without guest)

    a = sample()
    time.sleep(window_s)
    b = sample()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_for_idle_cpu(max_wait_s: float, threshold: float = 0.9) -> float | None:
    """Wait up to ``max_wait_s`` until the CPUs are at least ``threshold`` idle; return the last
    idle fraction seen.

    On a shared machine another process on one of two cores halves GEMM rate and can slow a
    batch-1 decode tenfold (OpenMP threads wait on a descheduled peer), so a benchmark started
    in a quiet moment measures the engine rather than the neighbours.
    """
    deadline = time.monotonic() + max_wait_s
    idle = cpu_idle_fraction()
    while idle is not None and idle < threshold and time.monotonic() < deadline:
        idle = cpu_idle_fraction()
    return idle
