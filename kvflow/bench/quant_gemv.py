"""`kvflow bench quant-gemv`: the quantised-weight CPU kernels (kvflow/csrc/cpu_quant.h) on one
layer's matrices of a reference shape, against the bf16 products the C++ forward runs today.

Each matrix of a decoder layer (qkv, o, gate_up, down) at `135m` or `500m` is multiplied by a few
activation rows, per format (q8_0, q4_0, q4_k where K allows, int8; bipolar2 ... bipolar8: n-bit bit
planes in groups of 64, whose GEMV decodes or decomposes the planes; bipolarN-aA: the same weights with
activations rounded to A bits, every product a popcount of two planes) and activation mode (exact, q8),
next to bf16's oneDNN-prepacked `F.linear` and the C++ forward's `block_rows` decode GEMV. Reported:
µs per call (median), the weight bytes streamed per µs (GB/s) and the ratio to the bf16 GEMV. With
`--rows` above the GEMV's batch it compares the prefill GEMM (dequantised tiles through at::mm; int8 W8A8:
oneDNN's int8 GEMM on the codes) with bf16 `F.linear`. int8 W8A8 is also timed as a layer runs it where
the CPU has AVX-512 VNNI: on its VNNI-packed codes (csrc/cpu_vnni_packed.h), at every row count; so are q8_0
and q4_0 with q8 activations (and, above 8 rows, their row-major path: q8-rounded activations times dequantised
tiles).
Weights are random bytes with sane scales: speed does not depend on values.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvflow.bench.make_model import SHAPES
from kvflow.model import cpu_kernels
from kvflow.model.linear import block_rows
from kvflow.model.quant import kernels
from kvflow.model.quant.weights import QuantizedWeight

GEMV_ROWS = 8  # cpu_quant.h's kGemvRows: up to this many rows take the GEMV
_BLOCK_BYTES = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_k": (256, 144)}
BIPOLAR_GROUP = 64
#: What `--formats` takes: the kernels' formats, bipolar by its bits.
BENCH_FORMATS = ("q8_0", "q4_0", "q4_k", "int8", *(f"bipolar{n}" for n in range(2, 9)),
                 *(f"bipolar{n}-a{a}" for n in range(2, 9) for a in range(2, 9)))
DEFAULT_FORMATS = ("q8_0", "q4_0", "q4_k", "int8")


@dataclass
class Row:
    matrix: str
    n: int
    k: int
    method: str
    us: float
    gb_s: float
    vs_gemv: float | None  # the baseline's time / this one's (>1: faster); baseline: the bf16 block_rows
    # GEMV for decode rows where it runs, else bf16 oneDNN


def layer_matrices(shape: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear of one decoder layer (qkv fused, gate_up fused) of a reference shape."""
    cfg = SHAPES[shape]
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    return {"qkv": (hidden + 2 * kv, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden),
            "down": (hidden, inter)}


def activation_bits(fmt: str) -> int | None:
    """The A of a `bipolarN-aA` name (bipolar's A-bit variant); None for float activations."""
    return int(fmt.split("-a")[1]) if fmt.startswith("bipolar") and "-a" in fmt else None


def random_weight(fmt: str, n: int, k: int, gen: torch.Generator) -> QuantizedWeight:
    """A weight of random codes with small, finite fp16 scales."""
    if fmt.startswith("bipolar"):
        bits, groups = int(fmt.removeprefix("bipolar").split("-")[0]), k // BIPOLAR_GROUP
        planes = torch.randint(0, 256, (n, bits, k // 8), dtype=torch.uint8, generator=gen)
        scales = (torch.rand(n, groups, generator=gen) * 0.01).half()
        return QuantizedWeight("bipolar", (n, k), {"planes": planes, "scales": scales, "offsets": scales * 0.1},
                               {"bits": bits, "group_size": BIPOLAR_GROUP})
    if fmt == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        return QuantizedWeight("int8", (n, k), {"qweight": q, "scales": torch.rand(n, generator=gen) * 0.01})
    block, nbytes = _BLOCK_BYTES[fmt]
    blocks = torch.randint(0, 256, (n, k // block, nbytes), dtype=torch.uint8, generator=gen)
    halves = 2 if fmt == "q4_k" else 1  # q4_k: d and dmin
    scales = (torch.rand(n, k // block, halves, generator=gen) * 0.01).half().view(torch.uint8)
    blocks[..., : 2 * halves] = scales.view(n, k // block, 2 * halves)
    return QuantizedWeight(fmt, (n, k), {"blocks": blocks.view(n, -1)})


def time_us(fns: list[Callable[[], object]], min_seconds: float) -> float:
    """Median µs per call over repeats filling about `min_seconds` (after a warm-up), taking the calls
    in turn: each on its own copy of the weight, so that together they stream from memory, as a
    model's layers do, rather than from a cache that one small matrix fits in."""
    for fn in fns:
        fn()
    start = time.perf_counter()
    for fn in fns:
        fn()
    once = max((time.perf_counter() - start) / len(fns), 1e-6)
    times = []
    for i in range(max(5 * len(fns), int(min_seconds / once))):
        fn = fns[i % len(fns)]
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def bench_matrix(name: str, n: int, k: int, rows: int, formats: list[str], min_seconds: float,
                 gen: torch.Generator, stream_bytes: int, gemv_kernels: tuple[str, ...] = ("auto",)) -> list[Row]:
    """One matrix: bf16 baselines then each format and mode (decode: with each of `gemv_kernels`, those
    that cover the format) or GEMM path (prefill), each over as many copies of its weight as fill
    `stream_bytes`."""
    copies = max(1, -(-stream_bytes // (n * k * 2)))
    dense = [(torch.randn(n, k, generator=gen) * 0.02).bfloat16() for _ in range(copies)]
    x = torch.randn(rows, k, generator=gen).bfloat16()
    packed = [torch.ops.mkldnn._reorder_linear_weight(d, rows) for d in dense]
    cases: list[tuple[str, int, list[Callable[[], object]]]] = [
        ("bf16 onednn", n * k * 2,
         [lambda p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]),
    ]
    ext = cpu_kernels.load_extension()
    blocked = [block_rows(d) for d in dense]
    decode = rows <= GEMV_ROWS
    if decode and ext is not None and ext.has_decode_gemv and blocked[0] is not None and rows <= ext.decode_rows:
        cases.append(("bf16 block_rows", n * k * 2,
                      [lambda b=b: ext.decode_linear(x, b, torch.empty(0)) for b in blocked]))
    del dense
    for fmt in formats:
        qws = [random_weight(fmt, n, k, gen) for _ in range(copies)]
        a_bits = activation_bits(fmt)
        if kernels.unsupported_reason(qws[0], activation_bits=a_bits) is not None:
            continue
        names = [g for g in gemv_kernels if g in kernels.gemv_kernels(qws[0].format, a_bits)]
        if a_bits:  # one kernel for every row count: popcounts of plane pairs
            variants = [(f" [{g}]" if gemv_kernels != ("auto",) else "", "popcount", "auto", g) for g in names]
        else:
            modes = ("exact",) if qws[0].format == "bipolar" else kernels.ACTIVATIONS  # bipolar: float activations
            variants = [(f" [{g}]" if gemv_kernels != ("auto",) else "", mode, "auto", g)
                        for mode in modes for g in names] if decode else [("", "gemm-mm", "mm", "auto")]
            if not decode and fmt == "int8":  # W8A8 on the row-major codes: oneDNN's int8 GEMM
                variants.append(("", "q8 (int8 GEMM)", "mm", "auto"))
        for suffix, label, path, gemv in variants:
            mode = "exact" if label in ("popcount", "gemm-mm") else label.split()[0]
            cases.append((f"{fmt} {label}{suffix}", qws[0].nbytes(),
                          [lambda qw=qw, mode=mode, path=path, gemv=gemv, a_bits=a_bits:
                           kernels.quant_matmul(x, qw, mode, path=path, kernel=gemv, activation_bits=a_bits)
                           for qw in qws]))
        if fmt == "int8" and kernels.int8_vnni_available():  # W8A8 as a layer runs it: the codes VNNI-packed
            packed_codes = [(kernels.pack_int8_vnni(qw.data["qweight"]), qw.data["scales"]) for qw in qws]
            cases.append(("int8 q8 (vnni-packed)", packed_codes[0][0].numel(),
                          [lambda p=p, sc=sc: kernels.int8_vnni_matmul(x, p, sc, n, k) for p, sc in packed_codes]))
        if fmt in kernels.GGUF_VNNI and kernels.int8_vnni_available():  # q8 activations as a layer runs them
            packed_blocks = [kernels.GGUF_VNNI[fmt][0](qw.data["blocks"], n, k) for qw in qws]
            cases.append((f"{fmt} q8 (vnni-packed)", packed_blocks[0].numel(),
                          [lambda p=p, f=fmt: kernels.gguf_vnni_matmul(x, p, f, n, k) for p in packed_blocks]))
            if not decode:
                cases.append((f"{fmt} q8 (tiles)", qws[0].nbytes(),
                              [lambda qw=qw: kernels.quant_matmul(x, qw, "q8", path="mm") for qw in qws]))
    base_method = "bf16 block_rows" if any(c[0] == "bf16 block_rows" for c in cases) else "bf16 onednn"
    results = [Row(name, n, k, method, us, nbytes / us / 1e3, None)
               for method, nbytes, fn in cases for us in [time_us(fn, min_seconds)]]
    base = next(r.us for r in results if r.method == base_method)
    for r in results:
        r.vs_gemv = base / r.us
    return results


def run(shape: str, rows: int = 1, formats: tuple[str, ...] = DEFAULT_FORMATS, min_seconds: float = 0.3,
        threads: int | None = None, seed: int = 0, stream_mib: int = 96,
        gemv_kernels: tuple[str, ...] = ("auto",)) -> list[Row]:
    """Every matrix of one layer of `shape`; `stream_mib`: the bf16 bytes each method cycles through
    (above the last-level cache, so weights come from memory); `gemv_kernels`: the decode GEMV's kernels
    to time side by side (kernels.quant_matmul's `kernel`)."""
    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    results: list[Row] = []
    for name, (n, k) in layer_matrices(shape).items():
        results += bench_matrix(name, n, k, rows, list(formats), min_seconds, gen, stream_mib << 20, gemv_kernels)
    return results


def format_rows(results: list[Row], rows: int) -> str:
    lines = [f"{'matrix':8} {'N x K':>11} {'method':24} {'µs/call':>9} {'GB/s':>7} {'speed vs bf16 baseline':>22}"]
    for r in results:
        ratio = f"{r.vs_gemv:.2f}x" if r.vs_gemv is not None else "-"
        lines.append(f"{r.matrix:8} {f'{r.n}x{r.k}':>11} {r.method:24} {r.us:9.1f} {r.gb_s:7.1f} {ratio:>22}")
    return "\n".join(lines)
