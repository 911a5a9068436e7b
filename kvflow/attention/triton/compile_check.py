"""Compile the Triton attention kernels for NVIDIA GPUs on a machine without one.

Triton's interpreter (how the kernels are tested on CPU) runs the kernels' Python, not the
compiler: a kernel can pass every interpreter test and still fail to compile for a GPU, spill
registers, or need more shared memory than the GPU has. This check calls the real wrappers
(`store_kv`, `prefill_attention`, `decode_attention`, the KIVI ones) with small CPU tensors, catches each launch
instead of running it, and compiles that exact launch (arguments, constexprs, warps, stages, with
the launch configuration the wrapper picks for the target's compute capability) through Triton's
NVIDIA backend down to a cubin. ptxas then reports registers and spills. What it cannot tell is
speed: that needs the GPU (`kvflow bench attention --check-targets`, see .ci/gpu).

    python -m kvflow.attention.triton.compile_check [--arch 80 90] [--variant causal ...] [--json FILE]

It exits non-zero if any launch fails to compile, exceeds the architecture's shared memory, or
spills registers in 16-bit. TRITON_INTERPRET must be unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

import torch

# Shared memory a block may use (opt-in maximum), by compute capability.
MAX_SHARED_BYTES = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LaunchReport:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    variant: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Compiled, fits the GPU's shared memory, and (16-bit: the fast path) spills nothing.
        fp32 is the exactness mode: its small spills are reported, not failed."""
        spills_ok = self.spill_bytes == 0 or self.dtype == "float32"
        return self.error is None and spills_ok and self.shared_bytes <= MAX_SHARED_BYTES[self.arch]


@dataclass
class _Launch:
    kernel: Any  # triton JITFunction
    args: tuple
    kwargs: dict[str, Any]


def _capture_launches(fn: Callable[[], Any], kernels: list[Any]) -> list[_Launch]:
    """Run `fn`, recording each launch of `kernels` instead of executing it."""
    launches: list[_Launch] = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(_Launch(kernel, args, kwargs))
        return run

    with ExitStack() as stack:
        for kernel in kernels:
            stack.enter_context(mock.patch.object(kernel, "run", recorder(kernel), create=True))
        fn()
    return launches


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) of the PTX, from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
             "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = result.stderr + result.stdout
    registers = max((int(r) for r in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _compile(launch: _Launch, arch: int) -> tuple[int, int, int]:
    """Compile one captured launch for sm_<arch>: (shared bytes, registers, spill bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    registers, spills = _ptxas_stats(compiled.asm["ptx"], arch)
    return compiled.metadata.shared, registers, spills


def _scenarios(dtype: torch.dtype, head_dim: int) -> list[tuple[str, Callable[[], Any]]]:
    """The wrapper calls whose launches are compiled: every kernel and constexpr variant the
    engine uses (windowed or not, split or not, dense, int8, fp8 or KIVI cache), at this dtype and
    head size. fp8 compiles with the GPU's fp8 conversions where it has them (sm_89 and later), else
    with the integer ones (_common.fp8_native)."""
    from kvflow.attention.shared_prefix import SharedPrefixGroups, max_members
    from kvflow.attention.triton import decode_attention, prefill_attention, store_kv
    from kvflow.attention.triton.kivi import kivi_decode_attention, kivi_prefill_attention

    num_heads, num_kv_heads, block_size = 32, 8, 16
    seq_lens = torch.tensor([300, 900])
    block_tables = torch.arange(2 * 64).view(2, 64)
    cache = torch.zeros(2, 128, num_kv_heads, block_size, head_dim, dtype=dtype)
    int8 = (torch.zeros(cache.shape, dtype=torch.int8), torch.zeros(*cache.shape[:4], 1))  # (codes, scales)
    fp8 = (torch.zeros(cache.shape, dtype=torch.float8_e4m3fn), torch.ones(2, num_kv_heads, 1))  # (codes, head_scales)
    q_prefill = torch.zeros(200, num_heads, head_dim, dtype=dtype)
    qsl = torch.tensor([0, 100, 200])
    q_decode = torch.zeros(2, num_heads, head_dim, dtype=dtype)
    q_decode_gqa8 = torch.zeros(2, 8 * num_kv_heads, head_dim, dtype=dtype)  # the largest GQA group we plan for
    kv = torch.zeros(4, num_kv_heads, head_dim, dtype=dtype)
    def launches(kv_cache: Any, suffix: str, names: tuple[str, ...]) -> list[tuple[str, Callable[[], Any]]]:
        calls = {
            "store": lambda: store_kv(kv, kv, kv_cache, torch.arange(4)),
            "causal": lambda: prefill_attention(q_prefill, kv_cache, qsl, seq_lens, block_tables, 0.1,
                                                max_query_len=100),
            "window": lambda: prefill_attention(q_prefill, kv_cache, qsl, seq_lens, block_tables, 0.1, 64,
                                                max_query_len=100),
            "nosplit": lambda: decode_attention(q_decode, kv_cache, seq_lens, block_tables, 0.1, num_splits=1),
            "split": lambda: decode_attention(q_decode, kv_cache, seq_lens, block_tables, 0.1, max_seq_len=900),
            "split-window": lambda: decode_attention(q_decode, kv_cache, seq_lens, block_tables, 0.1, 64,
                                                     num_splits=4),
            "shared": lambda: decode_attention(q_decode, kv_cache, seq_lens, block_tables, 0.1, max_seq_len=900,
                                               shared=shared),
            # 8 query heads per kv head: detection then allows 8 members (64 rows).
            "shared-gqa8": lambda: decode_attention(q_decode_gqa8, kv_cache, seq_lens, block_tables, 0.1,
                                                    max_seq_len=900, shared=shared_gqa8),
        }
        return [(name + suffix, calls[name]) for name in names]

    # Shared-prefix groups at their tallest tiles: as many members as detection allows a GQA group.
    def groups(query_heads_per_kv: int) -> SharedPrefixGroups:
        return SharedPrefixGroups(torch.tensor([[0, 2, 16]]), torch.tensor([0, 1]), max_members(query_heads_per_kv), 16)

    shared, shared_gqa8 = groups(num_heads // num_kv_heads), groups(8)

    quantised = ("store", "causal", "window", "nosplit", "split-window", "shared")  # split differs only in count

    def kivi_launches(bits: int) -> list[tuple[str, Callable[[], Any]]]:
        """KIVI (32-token blocks, R = 128): prefill and decode over codes, meta and ring (store_kivi is PyTorch)."""
        blocks = torch.zeros(2, 64, num_kv_heads, 32, 1)
        kivi = (torch.zeros(*blocks.shape[:4], head_dim * bits // 8, dtype=torch.uint8),
                torch.zeros(*blocks.shape[:4], head_dim // 16, dtype=torch.float16),
                torch.zeros(2, 2, num_kv_heads, 160, head_dim, dtype=dtype))
        tables = torch.arange(64).view(2, 32)
        quantised, slots = torch.tensor([128, 640]), torch.tensor([0, 1])
        k_prefill, k_decode = torch.zeros(200, num_kv_heads, head_dim, dtype=dtype), kv[:2]
        prefill = (q_prefill, k_prefill, k_prefill, kivi, bits, qsl, seq_lens, quantised, slots, tables, 0.1)
        decode = (q_decode, k_decode, k_decode, kivi, bits, seq_lens, quantised, slots, tables, 0.1)
        calls = {
            "causal": lambda: kivi_prefill_attention(*prefill, max_query_len=100),
            "window": lambda: kivi_prefill_attention(*prefill, 64, max_query_len=100),
            "nosplit": lambda: kivi_decode_attention(*decode, num_splits=1),
            "split-window": lambda: kivi_decode_attention(*decode, 64, num_splits=4),
        }
        return [(f"{name}-kivi{bits}", call) for name, call in calls.items()]

    return (launches(cache, "", ("store", "causal", "window", "nosplit", "split", "split-window", "shared",
                                 "shared-gqa8"))
            + launches(int8, "-int8", quantised) + launches(fp8, "-fp8", quantised)
            + kivi_launches(4) + kivi_launches(2))


def check(archs: list[int], dtypes: list[str], head_dims: list[int], multiprocessors: int = 132,
          variants: list[str] | None = None) -> list[LaunchReport]:
    """Compile every launch of every scenario (or of those named in `variants`) for each (arch,
    dtype, head_dim)."""
    from kvflow.attention.triton import decode, kivi, kv_store, prefill

    kernels = [kv_store._store_kv_kernel, prefill._prefill_kernel, decode._decode_split_kernel,
               decode._decode_shared_kernel, decode._decode_merge_kernel, kivi._kivi_prefill_kernel,
               kivi._kivi_decode_kernel]
    if not all(hasattr(k, "_pack_args") for k in kernels):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET is set): unset it to compile them")
    reports = []
    for arch in archs:
        capability = (arch // 10, arch % 10)
        with ExitStack() as stack:  # the wrappers pick the launch configuration of this GPU
            for module in (prefill, decode, kv_store, kivi):
                stack.enter_context(mock.patch.object(module, "device_capability", lambda _d, c=capability: c))
            for module in (decode, kivi):
                stack.enter_context(mock.patch.object(module, "multiprocessor_count", lambda _d: multiprocessors))
            for dtype_name in dtypes:
                for head_dim in head_dims:
                    for variant, call in _scenarios(DTYPES[dtype_name], head_dim):
                        if variants is not None and variant not in variants:
                            continue
                        for launch in _capture_launches(call, kernels):
                            constexprs = {k: v for k, v in launch.kwargs.items() if k.isupper()}
                            report = LaunchReport(
                                launch.kernel.fn.__name__.lstrip("_"), arch, dtype_name, head_dim, variant,
                                constexprs, launch.kwargs.get("num_warps", 4), launch.kwargs.get("num_stages", 3),
                            )
                            try:
                                report.shared_bytes, report.registers, report.spill_bytes = _compile(launch, arch)
                            except Exception as e:  # noqa: BLE001 - reported per launch, the check goes on
                                report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                            reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(MAX_SHARED_BYTES))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--variant", nargs="+", help="only these scenarios (default: all), e.g. causal split-int8")
    parser.add_argument("--json", help="also write the reports here")
    args = parser.parse_args(argv)
    reports = check(args.arch, args.dtype, args.head_dim, variants=args.variant)
    print(f"{'kernel':<20} {'sm':>3} {'dtype':<9} {'D':>4} {'variant':<17} {'tiles':<16} {'w/s':>4} "
          f"{'smem KiB':>8} {'regs':>4} {'spill':>5}  result")
    for r in reports:
        tiles = "x".join(str(r.constexprs[k]) for k in ("BLOCK_M", "BLOCK_G", "BLOCK_N", "BLOCK_S", "BLOCK_H")
                         if k in r.constexprs)
        if not r.ok:
            verdict = r.error or ("spills" if r.spill_bytes and r.dtype != "float32" else "shared memory")
        else:
            verdict = "ok (fp32 spills)" if r.spill_bytes else "ok"
        print(f"{r.kernel:<20} {r.arch:>3} {r.dtype:<9} {r.head_dim:>4} {r.variant:<17} {tiles:<16} "
              f"{r.num_warps}/{r.num_stages} {r.shared_bytes / 1024:>8.1f} {r.registers:>4} {r.spill_bytes:>5}  "
              f"{verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in reports], f, indent=1)
    failed = sum(not r.ok for r in reports)
    print(f"{len(reports) - failed}/{len(reports)} launches compile within their GPU's limits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
