"""`kvflow bench bitplane`: the Triton bit-plane kernels (kvflow/model/quant/triton/bitplane.py) on one
decoder layer's matrices of a reference shape, against torch's bf16 matmul of the same product.

For each matrix (qkv, o, gate_up, down), weight width n and activation rows M: torch's `F.linear`
on the dense weight ("torch", in the activations' dtype, bf16 by default); the Triton kernel with
the planes recombined in registers ("triton") and with one MMA per plane ("triton-planewise", the
paper's decomposition on 16-bit tensor cores); and the A-bit variant ("triton-a8": activations
rounded to 8-bit bipolar codes, int8 MMAs of ±1 planes).

Reported per call (medians): GPU µs with one pass over the weight copies captured in a CUDA graph
(kernel time, no launch overhead) and µs launched eagerly from Python (as kvflow's runner, which has
no CUDA graphs, runs them), each with the dense product's time over this one's (>1: faster); weight
bytes per µs (GB/s); and each kernel's largest error against the torch reference of the same
computation (`bitplane_linear`, `bitplane_linear_abit`) relative to that output's largest magnitude.

Each method cycles through its own copies of the weight filling `stream_mib`, so weights come from
memory as a model's layers do, not from an L2 that one matrix fits in (an H100/H200 has 50 MiB).
Weights are `quantize_bipolar` of random normal matrices (speed does not depend on values).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvflow.model.quant import bipolar
from kvflow.model.quant.weights import QuantizedWeight

IMPLS = ("torch", "triton", "triton-planewise", "triton-a8")
MAX_REL_ERR = 1e-2  # 16-bit outputs: a few roundings of the result


@dataclass
class BitplaneResult:
    matrix: str
    n: int  # output features
    k: int  # input features
    bits: int
    rows: int
    impl: str
    us: float  # GPU time per call (CUDA graph replay); wall time off GPU
    us_eager: float  # per call launched from Python, as kvflow runs it
    gb_s: float  # weight bytes (planes + scales + offsets, or the dense weight) per µs of `us`
    vs_torch: float | None  # the dense product's `us` / this one's (>1: faster)
    vs_torch_eager: float | None
    rel_err: float | None  # max |y − reference| / max |reference|; None for the dense product


def _pass(fns: list[Callable[[], object]]) -> Callable[[], None]:
    def run() -> None:
        for fn in fns:
            fn()
    return run


def time_us(fns: list[Callable[[], object]], device: torch.device, repeats: int) -> tuple[float, float]:
    """(kernel, eager) µs per call, medians over `repeats` passes over `fns` (the weight copies).
    On a GPU "kernel" replays one pass captured in a CUDA graph (GPU time, no launch overhead) and
    "eager" launches from Python as kvflow's runner does (no CUDA graphs); elsewhere both are wall time."""
    one_pass = _pass(fns)
    one_pass()  # warm-up: compiles
    if device.type != "cuda":
        def wall() -> float:
            t0 = time.perf_counter()
            one_pass()
            return (time.perf_counter() - t0) * 1e6 / len(fns)
        us = statistics.median(wall() for _ in range(repeats))
        return us, us
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        one_pass()
        with torch.cuda.graph(graph, stream=stream):
            one_pass()
    torch.cuda.current_stream().wait_stream(stream)

    def timed(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / len(fns)

    kernel = statistics.median(timed(graph.replay) for _ in range(repeats))
    eager = statistics.median(timed(one_pass) for _ in range(repeats))
    return kernel, eager


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.float().abs().max().clamp_min(1e-30)
    return float((y.float() - ref.float()).abs().max() / scale)


def bench_matrix(name: str, n: int, k: int, bits: int, rows: int, group: int, impls: tuple[str, ...],
                 device: torch.device, dtype: torch.dtype, repeats: int, stream_mib: float,
                 seed: int = 0) -> list[BitplaneResult]:
    """One (matrix, n, M) case: every impl, timed on weight copies filling `stream_mib`."""
    from kvflow.model.quant.triton import bitplane as tb  # needs triton: imported only to run

    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=gen, device=device) * 0.02
    x = torch.randn(rows, k, generator=gen, device=device).to(dtype)
    qw = bipolar.quantize_bipolar(w, bits, group)
    dense = w.to(dtype)
    copies = max(1, int(stream_mib * 2**20 // dense.nbytes))
    denses = [dense.clone() for _ in range(copies)]
    qws = [QuantizedWeight(qw.format, qw.shape, {key: t.clone() for key, t in qw.data.items()}, qw.params)
           for _ in range(copies)]
    cases: dict[str, tuple[list[Callable[[], object]], int, Callable[[], torch.Tensor] | None]] = {
        "torch": ([lambda d=d: F.linear(x, d) for d in denses], dense.nbytes, None),
        "triton": ([lambda q=q: tb.bitplane_linear_triton(x, q) for q in qws], qw.nbytes(),
                   lambda: bipolar.bitplane_linear(x, qw, None)),
        "triton-planewise": ([lambda q=q: tb.bitplane_linear_triton(x, q, planewise=True) for q in qws],
                             qw.nbytes(), lambda: bipolar.bitplane_linear(x, qw, None)),
        "triton-a8": ([lambda q=q: tb.bitplane_linear_abit_triton(x, q, None, 8) for q in qws], qw.nbytes(),
                      lambda: bipolar.bitplane_linear_abit(x, qw, None, 8)),
    }
    results = []
    base = (0.0, 0.0)
    for impl in ("torch", *[i for i in impls if i != "torch"]):
        fns, nbytes, reference = cases[impl]
        us, eager = time_us(fns, device, repeats)
        if impl == "torch":
            base = (us, eager)
        if impl in impls:
            err = None if reference is None else _rel_err(fns[0](), reference())
            ratios = (None, None) if impl == "torch" else (base[0] / us, base[1] / eager)
            results.append(BitplaneResult(name, n, k, bits, rows, impl, us, eager, nbytes / us / 1e3, *ratios, err))
    return results


def run(matrices: dict[str, tuple[int, int]], bits: tuple[int, ...], rows: tuple[int, ...], group: int,
        impls: tuple[str, ...], device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 20,
        stream_mib: float = 256) -> list[BitplaneResult]:
    """Every (matrix, bits, rows) case, activations and the dense weight in `dtype` (bf16 by default;
    the interpreter has no bf16 tl.dot). The dense product is timed in every case (the ratios need it)."""
    results = []
    for name, (n, k) in matrices.items():
        for b in bits:
            for m in rows:
                results += bench_matrix(name, n, k, b, m, group, impls, device, dtype, repeats, stream_mib)
    return results


def format_results(results: list[BitplaneResult]) -> str:
    lines = [f"{'matrix':<8} {'N x K':>11} {'n':>2} {'M':>4} {'impl':<17} {'µs':>8} {'GB/s':>7} {'vs torch':>8} "
             f"{'µs eager':>9} {'vs torch':>8} {'rel err':>8}"]
    for r in results:
        ratio = "" if r.vs_torch is None else f"{r.vs_torch:.2f}x"
        ratio_eager = "" if r.vs_torch_eager is None else f"{r.vs_torch_eager:.2f}x"
        err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
        lines.append(f"{r.matrix:<8} {f'{r.n}x{r.k}':>11} {r.bits:>2} {r.rows:>4} {r.impl:<17} {r.us:>8.1f} "
                     f"{r.gb_s:>7.1f} {ratio:>8} {r.us_eager:>9.1f} {ratio_eager:>8} {err:>8}")
    return "\n".join(lines)


def inaccurate(results: list[BitplaneResult]) -> list[BitplaneResult]:
    """Results whose error against their torch reference exceeds MAX_REL_ERR."""
    return [r for r in results if r.rel_err is not None and not r.rel_err <= MAX_REL_ERR]


def save_results(results: list[BitplaneResult], path: Path, device: torch.device, shape: str, group: int,
                 dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    payload = {"kind": "bitplane", "device": device_name, "torch_version": torch.__version__, "shape": shape,
               "group_size": group, "dtype": str(dtype).removeprefix("torch."), "max_rel_err": MAX_REL_ERR,
               "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=1))
