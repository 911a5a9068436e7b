"""int8 per output channel: codes and scales as defined, W8A16 and W8A8 against fp64 references, and
W8A8's integer product exactly equal to an int64 one."""

from __future__ import annotations

import torch

from kvflow.model.quant import int8


def test_codes_and_scales_are_per_output_channel_symmetric():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)
    w[2] = 0.0  # a zero row: scale 0, codes 0
    qw = int8.quantize_int8(w)
    q, s = qw.data["qweight"], qw.data["scales"]
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert torch.equal(s, w.abs().amax(1) / 127) and s[2] == 0 and not q[2].any()
    assert int(q.abs().max()) == 127  # the largest magnitude of each row lands on ±127
    err = (int8.dequantize_int8(qw) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())  # round to nearest: within half a step


def test_w8a16_matches_fp64_of_the_dequantised_weights():
    g = torch.Generator().manual_seed(1)
    w, x, b = torch.randn(24, 64, generator=g), torch.randn(5, 64, generator=g), torch.randn(24, generator=g)
    qw = int8.quantize_int8(w)
    reference = x.double() @ int8.dequantize_int8(qw).double().t() + b.double()
    assert torch.allclose(int8.linear_w8a16(x, qw, b).double(), reference, rtol=1e-5, atol=1e-5)


def test_w8a8_integer_product_is_exact_and_the_result_matches_fp64():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(24, 96, generator=g), torch.randn(7, 96, generator=g) * 3
    qw = int8.quantize_int8(w)
    codes, sx = int8.quantize_activations_int8(x)
    acc = int8.int8_matmul(codes, qw.data["qweight"])
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), codes.long() @ qw.data["qweight"].long().t())
    x_rounded = codes.double() * sx.double()[:, None]
    reference = x_rounded @ int8.dequantize_int8(qw).double().t()
    assert torch.allclose(int8.linear_w8a8(x, qw, None).double(), reference, rtol=1e-5, atol=1e-5)
    exact = x.double() @ w.double().t()
    assert float((int8.linear_w8a8(x, qw, None).double() - exact).norm() / exact.norm()) < 0.01
