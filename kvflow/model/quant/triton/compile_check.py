"""Compile the bit-plane kernels (bitplane.py) for NVIDIA GPUs on a machine without one.

The interpreter tests run the kernels' Python, not the compiler: a launch can pass them and still
fail to compile, spill registers or overflow shared memory. This calls the real wrappers on CPU
tensors of a 500m-shaped matrix (qkv: 1152 x 896, groups of 64) with the launch configuration they
pick for each GPU, catches the launches and compiles them to cubins through Triton's NVIDIA backend
(the machinery of kvflow.attention.triton.compile_check), reading registers and spills from ptxas.

    python -m kvflow.model.quant.triton.compile_check [--arch 80 90] [--dtype bfloat16 float32] [--bits 2 4 8]

Exits non-zero if a launch fails to compile, exceeds shared memory, or spills in 16-bit (fp32, the
exactness mode, may spill: reported). TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from unittest import mock

import torch

from kvflow.attention.triton.compile_check import MAX_SHARED_BYTES, _capture_launches, _compile
from kvflow.model.quant import bipolar
from kvflow.model.quant.triton import bitplane as triton_bitplane

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SCHEDULES = ("fused", "planewise", "a8")
N, K, GROUP = 1152, 896, 64


@dataclass
class Report:
    arch: int
    dtype: str
    bits: int
    rows: int
    schedule: str
    tiles: str
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        spills_ok = self.spill_bytes == 0 or self.dtype == "float32"
        return self.error is None and spills_ok and self.shared_bytes <= MAX_SHARED_BYTES[self.arch]


def _calls(x: torch.Tensor, bits: int) -> dict[str, Callable[[], object]]:
    qw = bipolar.quantize_bipolar(torch.randn(N, K, generator=torch.Generator().manual_seed(bits)), bits, GROUP)
    return {"fused": lambda: triton_bitplane.bitplane_linear_triton(x, qw),
            "planewise": lambda: triton_bitplane.bitplane_linear_triton(x, qw, planewise=True),
            "a8": lambda: triton_bitplane.bitplane_linear_abit_triton(x, qw, None, 8)}


def check(archs: list[int], dtypes: list[str], bits: list[int], rows: list[int], schedules: list[str],
          multiprocessors: int = 132) -> list[Report]:
    kernels = [triton_bitplane._bitplane_kernel, triton_bitplane._bitplane_abit_kernel]
    if not all(hasattr(k, "_pack_args") for k in kernels):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET is set): unset it to compile them")
    reports = []
    for arch in archs:
        with ExitStack() as stack:  # the wrappers pick this GPU's launch configuration
            stack.enter_context(mock.patch.object(triton_bitplane, "device_capability",
                                                  lambda _d, c=(arch // 10, arch % 10): c))
            stack.enter_context(mock.patch.object(triton_bitplane, "multiprocessor_count", lambda _d: multiprocessors))
            for dtype in dtypes:
                for b in bits:
                    for m in rows:
                        calls = _calls(torch.zeros(m, K, dtype=DTYPES[dtype]), b)
                        for schedule in schedules:
                            for launch in _capture_launches(calls[schedule], kernels):
                                tiles = "x".join(str(launch.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                                report = Report(arch, dtype, b, m, schedule, f"{tiles}/{launch.kwargs['num_warps']}")
                                try:
                                    report.shared_bytes, report.registers, report.spill_bytes = _compile(launch, arch)
                                except Exception as e:  # noqa: BLE001 - reported per launch, the check goes on
                                    report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                                reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(MAX_SHARED_BYTES))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--schedule", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    args = parser.parse_args(argv)
    reports = check(args.arch, args.dtype, args.bits, args.rows, args.schedule)
    print(f"{'sm':>3} {'dtype':<9} {'n':>2} {'M':>4} {'schedule':<10} {'tiles/warps':<13} {'smem KiB':>8} "
          f"{'regs':>4} {'spill':>5}  result")
    for r in reports:
        verdict = "ok" if r.ok else r.error or ("spills" if r.spill_bytes else "shared memory")
        print(f"{r.arch:>3} {r.dtype:<9} {r.bits:>2} {r.rows:>4} {r.schedule:<10} {r.tiles:<13} "
              f"{r.shared_bytes / 1024:>8.1f} {r.registers:>4} {r.spill_bytes:>5}  {verdict}")
    failed = sum(not r.ok for r in reports)
    print(f"{len(reports) - failed}/{len(reports)} launches compile within their GPU's limits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
