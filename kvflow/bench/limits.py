"""Physical limits of the machine a benchmark runs on: GEMM rate and memory read bandwidth.

Every throughput figure is reported next to the floor these imply, so a result says how far it
is from what the hardware allows rather than only how it compares with a peer:

* a decode step reads every weight once: it cannot beat ``weight_bytes / bandwidth``;
* a token costs ``2 · params`` FLOPs: offline throughput cannot beat ``bf16 rate / (2 · params)``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class MachineLimits:
    """Measured rates of this machine (best of a few runs, so closest to the true peak)."""

    bf16_gflops: float
    fp32_gflops: float
    mem_bw_gbs: float
    threads: int
    gemm_n: int
    bw_mib: int

    def gflops(self, dtype: str) -> float:
        """GEMM rate for a dtype name; half types use the bf16 rate, everything else fp32."""
        return self.bf16_gflops if dtype in ("bfloat16", "float16") else self.fp32_gflops

    def decode_step_floor_s(self, weight_bytes: float) -> float:
        """Shortest possible decode step: every weight byte read once from memory."""
        return weight_bytes / (self.mem_bw_gbs * 1e9)

    def tokens_per_s_ceiling(self, params: float, dtype: str = "bfloat16") -> float:
        """Most tokens (prompt or output) per second the GEMM rate allows at 2·params FLOPs each."""
        return self.gflops(dtype) * 1e9 / (2.0 * params)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON results."""
        return asdict(self)


def _best_time(fn: Any, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one untimed warm-up (the warm-up pays page faults)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_gflops(n: int = 2048, dtype: torch.dtype = torch.bfloat16, repeats: int = 5) -> float:
    """GFLOP/s of ``torch.matmul`` on two n×n matrices (2·n³ FLOPs per call)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    with torch.inference_mode():
        t = _best_time(lambda: torch.matmul(a, b, out=out), repeats)
    return 2.0 * n**3 / t / 1e9


def memory_read_gbs(mib: int = 512, repeats: int = 5) -> float:
    """GB/s of reading a ``mib`` MiB float32 tensor once (``tensor.sum()``), the decode-step pattern."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    with torch.inference_mode():
        t = _best_time(lambda: x.sum(), repeats)
    return x.numel() * x.element_size() / t / 1e9


@functools.lru_cache(maxsize=8)
def measure_limits(n: int = 2048, bw_mib: int = 512, repeats: int = 5) -> MachineLimits:
    """Measure bf16/fp32 GEMM rate and memory read bandwidth; cached per process and arguments.

    Takes about two seconds at the default sizes on a 2-core machine. Tests pass small sizes.
    """
    return MachineLimits(
        bf16_gflops=gemm_gflops(n, torch.bfloat16, repeats),
        fp32_gflops=gemm_gflops(n, torch.float32, repeats),
        mem_bw_gbs=memory_read_gbs(bw_mib, repeats),
        threads=torch.get_num_threads(),
        gemm_n=n,
        bw_mib=bw_mib,
    )


def format_limits(limits: MachineLimits) -> str:
    """One line for reports."""
    return (
        f"machine limits ({limits.threads} threads): bf16 GEMM {limits.bf16_gflops:.0f} GFLOP/s, "
        f"fp32 GEMM {limits.fp32_gflops:.0f} GFLOP/s, memory read {limits.mem_bw_gbs:.1f} GB/s"
    )
