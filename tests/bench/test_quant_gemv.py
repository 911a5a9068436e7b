"""`kvflow bench quant-gemv` on a real shape, briefly: every requested format and mode is timed, bipolar
through its bit-plane GEMV (float activations only) and its dequantised-tile GEMM above 8 rows."""

from __future__ import annotations

import pytest

from kvflow.bench import quant_gemv
from kvflow.model.quant import kernels

pytestmark = pytest.mark.skipif(kernels.load_extension() is None, reason="the C++ quantised kernels cannot build")


@pytest.mark.parametrize("rows", [1, 9])
def test_each_format_is_timed_against_the_bf16_baseline(rows):
    results = quant_gemv.run("135m", rows=rows, formats=("int8", "q8_0", "q4_0", "bipolar2", "bipolar4", "bipolar2-a8"),
                             min_seconds=0.001, threads=1, stream_mib=1)
    methods = {r.method for r in results if r.matrix == "qkv"}
    if rows == 1:
        assert {"int8 exact", "int8 q8", "bipolar2 exact", "bipolar4 exact", "bipolar2-a8 popcount"} <= methods
        assert not any(m.startswith("bipolar") and m.endswith("q8") for m in methods)
    else:
        assert {"int8 gemm-mm", "int8 q8 (int8 GEMM)", "bipolar2 gemm-mm", "bipolar4 gemm-mm",
                "bipolar2-a8 popcount"} <= methods
    assert ("int8 q8 (vnni-packed)" in methods) == kernels.int8_vnni_available()  # W8A8 as a layer holds it
    # q8_0 and q4_0 with q8 activations, likewise
    assert {"q8_0 q8 (vnni-packed)", "q4_0 q8 (vnni-packed)"} <= methods or not kernels.int8_vnni_available()
    assert {r.matrix for r in results} == {"qkv", "o", "gate_up", "down"}
    assert all(r.us > 0 and r.gb_s > 0 and r.vs_gemv is not None for r in results)
    # bytes streamed per call: bipolar n bits + fp16 scale and offset per 64 weights
    qkv = next(r for r in results if r.matrix == "qkv" and r.method in ("bipolar2 exact", "bipolar2 gemm-mm"))
    n, k = qkv.n, qkv.k
    assert round(qkv.gb_s * qkv.us * 1e3) == n * k * 2 // 8 + n * (k // 64) * 4


def test_the_cli_offers_bipolar_by_bits():
    assert {"bipolar2", "bipolar8", "bipolar2-a2", "bipolar8-a8"} <= set(quant_gemv.BENCH_FORMATS)
    assert "bipolar2" not in quant_gemv.DEFAULT_FORMATS
    assert (quant_gemv.activation_bits("bipolar3-a4"), quant_gemv.activation_bits("bipolar3")) == (4, None)
    assert quant_gemv.random_weight("bipolar3-a4", 8, 128, __import__("torch").Generator()).params["bits"] == 3
