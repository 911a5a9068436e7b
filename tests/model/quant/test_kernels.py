"""The quantised-weight CPU kernels against an fp64 product of independently dequantised weights
(gguf's numpy reference for the GGUF block formats)."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kvflow.model.quant import kernels
from kvflow.model.quant.weights import QuantizedWeight

ext = kernels.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the quantised-weight CPU kernels could not be built here")

GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0, "q4_k": GGMLQuantizationType.Q4_K}
#: (format, N, K): N not a multiple of the 16-row work unit or the 4-row GEMM block; q8_0/q4_0 with an
#: odd number of blocks (the GEMV works on pairs), int8 with K not a multiple of 64.
SHAPES = [("q8_0", 37, 96), ("q8_0", 20, 256), ("q4_0", 37, 96), ("q4_0", 21, 320), ("q4_k", 37, 512),
          ("q4_k", 18, 256), ("int8", 37, 100), ("int8", 19, 256)]


#: Every GEMV kernel this build has (AVX-512, AVX2, the scalar loops), each tested on its own.
KERNELS = list(ext.kernels) if ext is not None else ["scalar"]
AVX2_FORMATS = kernels.AVX2_FORMATS


def skip_uncovered(kernel: str, fmt: str) -> None:
    if kernel == "avx2" and fmt not in AVX2_FORMATS:
        pytest.skip(f"the AVX2 kernels cover {AVX2_FORMATS}")


def make_weight(fmt: str, n: int, k: int, seed: int = 0) -> tuple[QuantizedWeight, np.ndarray]:
    """A quantised weight and its fp64 dequantisation by an independent decoder."""
    rng = np.random.default_rng(seed)
    if fmt == "int8":
        q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        scales = rng.uniform(0.001, 0.02, size=n).astype(np.float32)
        qw = QuantizedWeight("int8", (n, k), {"qweight": torch.from_numpy(q), "scales": torch.from_numpy(scales)})
        return qw, q.astype(np.float64) * scales.astype(np.float64)[:, None]
    if fmt == "q4_k":  # random valid super-blocks: any bytes, with finite fp16 d and dmin
        blocks = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
        blocks[..., 0:2] = rng.uniform(0.0, 0.01, size=(n, k // 256)).astype(np.float16)[..., None].view(np.uint8)
        blocks[..., 2:4] = rng.uniform(0.0, 0.02, size=(n, k // 256)).astype(np.float16)[..., None].view(np.uint8)
        blocks = blocks.reshape(n, -1)
    else:
        blocks = gguf_quantize(rng.normal(0.0, 0.05, size=(n, k)).astype(np.float32), GGML[fmt])
    reference = gguf_dequantize(blocks, GGML[fmt]).astype(np.float64)
    return QuantizedWeight(fmt, (n, k), {"blocks": torch.from_numpy(blocks)}), reference


def activations(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4  # rows of different sizes
    x[:, k // 3] = 9.0  # an outlier, as real activations have
    return x.to(dtype)


def quantized_activations(x: np.ndarray, per_token: bool) -> tuple[np.ndarray, np.ndarray]:
    """The q8 mode's activations (numpy, fp32 arithmetic as the kernels): x̂ = d·round(x/d) and d per value."""
    m, k = x.shape
    groups = x.reshape(m, 1, k) if per_token else np.pad(x, ((0, 0), (0, -k % 32))).reshape(m, -1, 32)
    d = (np.abs(groups).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(groups * inv)
    xq = (q.astype(np.float64) * d).reshape(m, -1)[:, :k]
    step = np.broadcast_to(d, groups.shape).reshape(m, -1)[:, :k].astype(np.float64)
    return xq, step


def check(y: torch.Tensor, expected: np.ndarray, allowed: np.ndarray) -> None:
    """|y - expected| <= allowed, plus one bf16 rounding of y where y is bf16."""
    got = y.double().numpy()
    if y.dtype == torch.bfloat16:
        allowed = allowed + np.abs(got) * 2.0 ** -8
    err = np.abs(got - expected)
    worst = np.unravel_index(np.argmax(err - allowed), err.shape)
    assert (err <= allowed).all(), f"error {err[worst]:.3g} > allowed {allowed[worst]:.3g} at {worst}"


def rounding(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """fp32 summation slack: a few units of fp32 rounding of Σ|x||w|."""
    return 2e-6 * (np.abs(x) @ np.abs(w).T) + 1e-30


@pytest.mark.parametrize("fmt,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_exact_activations_match_the_fp64_product_of_the_dequantised_weights(fmt, n, k, dtype, kernel):
    skip_uncovered(kernel, fmt)
    scalar = kernel == "scalar"
    qw, w = make_weight(fmt, n, k)
    for m in (1, 3, 64):
        x = activations(m, k, dtype)
        xd = x.double().numpy()
        expected = xd @ w.T
        y = kernels.quant_matmul(x, qw, "exact", kernel=kernel)
        assert y.dtype == dtype and y.shape == (m, n)
        slack = rounding(xd, w)
        if m > ext.gemv_rows and not scalar and dtype == torch.bfloat16:
            slack = slack + 2.0 ** -8 * (np.abs(xd) @ np.abs(w).T)  # the GEMM's bf16 copy of W
        check(y, expected, slack)


@pytest.mark.parametrize("fmt,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_q8_activations_are_the_quantised_rows_times_the_dequantised_weights(fmt, n, k, dtype, kernel):
    """llama.cpp's arithmetic: within half a quantisation step of each activation (the bound), and equal
    to the product with the quantised activations up to fp32 rounding (the integer dot products)."""
    skip_uncovered(kernel, fmt)
    qw, w = make_weight(fmt, n, k)
    for m in (1, 3, 8):
        x = activations(m, k, dtype)
        xd = x.double().numpy()
        xq, step = quantized_activations(x.float().numpy(), per_token=fmt == "int8")
        y = kernels.quant_matmul(x, qw, "q8", path="gemv", kernel=kernel)
        slack = rounding(xd, w)
        check(y, xq @ w.T, slack)
        check(y, xd @ w.T, slack + 0.5 * (step @ np.abs(w).T) * (1 + 1e-6))


@pytest.mark.parametrize("fmt,n,k", [("q4_0", 45, 96), ("q4_k", 37, 512), ("int8", 37, 100)])
@pytest.mark.parametrize("path", ["mm", "gemv"])
def test_gemm_paths_agree_with_the_reference(fmt, n, k, path):
    """Every path at a prefill's row count, the "mm" one over several tiles (16 rows, N not a multiple)."""
    qw, w = make_weight(fmt, n, k)
    x = activations(24, k, torch.bfloat16)
    xd = x.double().numpy()
    expected = xd @ w.T
    y = kernels.quant_matmul(x, qw, path=path, tile_rows=16)
    check(y, expected, rounding(xd, w) + 2.0 ** -8 * (np.abs(xd) @ np.abs(w).T))


@pytest.mark.parametrize("fmt,n,k", [("q8_0", 37, 96), ("q4_0", 21, 320), ("q4_k", 37, 512), ("int8", 37, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_rows_beyond_the_gemv_take_the_gemvs_arithmetic(fmt, n, k, dtype):
    """A prefill's rows in q8 mode go through the GEMM with the activations as the GEMV rounds them: each
    row's result is the quantised row times the weights, whatever the number of rows."""
    qw, w = make_weight(fmt, n, k)
    x = activations(24, k, dtype)
    xq, _ = quantized_activations(x.float().numpy(), per_token=fmt == "int8")
    y = kernels.quant_matmul(x, qw, "q8", tile_rows=16)
    slack = rounding(xq, w)
    if dtype == torch.bfloat16:  # the GEMM's bf16 copies of W and of the rounded activations
        slack = slack + 2.0 ** -7 * (np.abs(xq) @ np.abs(w).T)
    check(y, xq @ w.T, slack)
    rows = torch.cat([kernels.quant_matmul(x[i : i + 3], qw, "q8") for i in range(0, 24, 3)])
    check(y, rows.double().numpy(), 2 * slack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_w8a8_rows_beyond_the_gemv_equal_the_gemv_bit_for_bit(dtype):
    """W8A8 prefill rows run the int8 GEMM on the codes (exact int32 sums, scaled in the GEMV's order),
    so each row equals the GEMV's result exactly, not merely within the dequantised-tile GEMM's rounding."""
    qw, w = make_weight("int8", 37, 100)
    x = activations(40, 100, dtype)
    y = kernels.quant_matmul(x, qw, "q8")
    gemv = kernels.quant_matmul(x, qw, "q8", path="gemv")
    assert torch.equal(y, gemv)
    xq, _ = quantized_activations(x.float().numpy(), per_token=True)
    check(y, xq @ w.T, rounding(xq, w))


def test_int8_w8a8_gemm_in_column_slices_equals_the_gemv():
    """Steps whose int32 sums would pass 8 MB (64 rows of a 33k-wide layer) run the GEMM in column
    slices (an LM head's vocabulary); every row still equals the GEMV's, slice edges included."""
    qw, w = make_weight("int8", 33000, 32)
    x = activations(64, 32, torch.float32)
    y = kernels.quant_matmul(x, qw, "q8")
    assert torch.equal(y, kernels.quant_matmul(x, qw, "q8", path="gemv"))
    xq, _ = quantized_activations(x.float().numpy(), per_token=True)
    check(y, xq @ w.T, rounding(xq, w))


def test_leading_dimensions_and_the_kernels_own_dequantiser():
    qw, w = make_weight("q4_0", 16, 64)
    x = activations(6, 64, torch.float32).view(2, 3, 64)
    assert kernels.quant_matmul(x, qw).shape == (2, 3, 16)
    np.testing.assert_array_equal(kernels.dequantize(qw).double().numpy(), w)


def test_unsupported_weights_and_inputs_are_refused_with_a_reason():
    qw, _ = make_weight("q4_k", 4, 256)
    other = QuantizedWeight("q6_k", (4, 256), {"blocks": torch.zeros(4, 210, dtype=torch.uint8)})
    with pytest.raises(kernels.QuantKernelUnsupported, match="not q6_k"):
        kernels.quant_matmul(torch.zeros(1, 256), other)
    with pytest.raises(kernels.QuantKernelUnsupported, match="float16"):
        kernels.quant_matmul(torch.zeros(1, 256, dtype=torch.float16), qw)
    odd = QuantizedWeight("q4_k", (4, 128), {"blocks": torch.zeros(4, 72, dtype=torch.uint8)})
    assert "multiple of 256" in kernels.unsupported_reason(odd)
    with pytest.raises(ValueError, match="activation"):
        kernels.quant_matmul(torch.zeros(1, 256), qw, "int4")
    with pytest.raises(RuntimeError, match="kernel is auto, avx512, avx2 or scalar"):
        kernels.quant_matmul(torch.zeros(1, 256), qw, kernel="neon")
    if "avx2" in KERNELS:
        int8, _ = make_weight("int8", 4, 256)
        with pytest.raises(RuntimeError, match="cover q8_0, q4_0 and q4_k"):
            kernels.quant_matmul(torch.zeros(1, 256), int8, kernel="avx2")


def test_a_failed_build_logs_why_and_refuses(monkeypatch, caplog):
    kernels.load_extension.cache_clear()
    monkeypatch.setattr("torch.utils.cpp_extension.verify_ninja_availability",
                        lambda: (_ for _ in ()).throw(RuntimeError("ninja is required")))
    try:
        with caplog.at_level(logging.WARNING, logger="kvflow.model.quant.kernels"):
            qw, _ = make_weight("q8_0", 4, 32)
            with pytest.raises(kernels.QuantKernelUnsupported, match="could not be built"):
                kernels.quant_matmul(torch.zeros(1, 32), qw)
        assert "unavailable" in caplog.text and "ninja is required" in caplog.text
    finally:
        kernels.load_extension.cache_clear()


def test_build_folder_follows_the_included_headers(tmp_path, monkeypatch):
    for name in ("cpu_quant.cpp", "cpu_quant.h"):
        (tmp_path / name).write_bytes((kernels.SOURCE.parent / name).read_bytes())
    (tmp_path / "unrelated.h").write_text("// not included\n")
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "cpu_quant.cpp")
    base = kernels.build_dir()
    (tmp_path / "unrelated.h").write_text("// changed\n")
    assert kernels.build_dir() == base
    header = tmp_path / "cpu_quant.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert kernels.build_dir() != base


def test_two_checkouts_keep_a_build_folder_each_and_a_compile_is_announced(tmp_path, monkeypatch, capsys):
    """torch's build.ninja names the source path: two checkouts sharing one folder rebuilt each other's build
    on each switch, silently (~1 min). The first compile says so on stderr, like the C++ forward's."""
    folders = []
    for checkout in ("a", "b"):
        (tmp_path / checkout).mkdir()
        for name in ("cpu_quant.cpp", "cpu_quant.h"):
            (tmp_path / checkout / name).write_bytes((kernels.SOURCE.parent / name).read_bytes())
        monkeypatch.setattr(kernels, "SOURCE", tmp_path / checkout / "cpu_quant.cpp")
        folders.append(kernels.build_dir())
    assert folders[0] != folders[1] and folders[0].parent == folders[1].parent
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_build(directory):
        calls.append(directory)
        (directory / f"{kernels.EXTENSION}.so").write_bytes(b"")
        return types.ModuleType(kernels.EXTENSION)

    monkeypatch.setattr(kernels, "_build", fake_build)
    kernels.load_extension.cache_clear()
    try:
        assert kernels.load_extension().__name__ == kernels.EXTENSION
        assert calls == [kernels.build_dir()] and calls[0].parent == tmp_path / "cache" / "cpu_quant"
    finally:
        kernels.load_extension.cache_clear()  # the next caller gets the real build back
    err = capsys.readouterr().err
    assert "kvflow: compiling the quantised-weight CPU kernels for this machine" in err
    assert "kvflow: compiled the quantised-weight CPU kernels in 0 s" in err
