"""`linear_f32` (kvflow/csrc/cpu_gemv_f32.h), the C++ forward's fp32 linear for steps of a few rows:
against an fp64 reference, over K and N that are not multiples of the vector width, and row by row
the same whatever rows share the call (a verification step's row equals a one-row decode step's)."""

from __future__ import annotations

import pytest
import torch

from kvflow.model.cpu_kernels import load_extension

ext = load_extension()
pytestmark = pytest.mark.skipif(ext is None or not ext.small_rows_f32, reason="needs the C++ build with AVX-512")


@pytest.mark.parametrize("n, k", [(512, 256), (4096, 128), (7, 37), (130, 352), (1, 16), (5, 3)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_fp64_and_rows_do_not_depend_on_their_neighbours(n, k, bias):
    g = torch.Generator().manual_seed(n * 1000 + k)
    weight = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(ext.small_rows_f32, k, generator=g)
    for m in range(1, ext.small_rows_f32 + 1):
        y = ext.linear_f32(x[:m], weight, torch.empty(0) if b is None else b)
        ref = torch.nn.functional.linear(x[:m].double(), weight.double(), None if b is None else b.double())
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * k**0.5)
        for row in range(m):  # bit for bit the row computed alone
            alone = ext.linear_f32(x[row:row + 1], weight, torch.empty(0) if b is None else b)
            assert torch.equal(y[row], alone[0])


def test_the_forwards_linear_takes_it_for_few_fp32_rows_only():
    """`linear` (what the forward and `CpuForward.logits` call) agrees with F.linear either way."""
    weight, x = torch.randn(64, 32), torch.randn(20, 32)
    for m in (1, ext.small_rows_f32, 20):
        got = ext.linear(x[:m], weight, torch.empty(0), False, torch.empty(0))
        torch.testing.assert_close(got, torch.nn.functional.linear(x[:m], weight))
    few = ext.linear(x[:3], weight, torch.empty(0), False, torch.empty(0))
    assert torch.equal(few, ext.linear_f32(x[:3], weight, torch.empty(0)))
