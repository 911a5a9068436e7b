"""The fused Triton FlashButterfly equals an fp64 direct convolution (on CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton's first import: triton.jit reads it when decorating
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvflow.model.longconv.conv import direct_conv  # noqa: E402
from kvflow.model.longconv.triton.butterfly import triton_butterfly_conv, triton_fft_size  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,taps", [(1, 1), (5, 5), (100, 100), (129, 40), (300, 300), (1000, 1000), (1024, 1025)])
def test_equals_direct_fp64(n, taps):
    g = torch.Generator().manual_seed(n)
    u = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    k = torch.randn(3, taps, generator=g, dtype=torch.float64)
    ref = direct_conv(u, k)
    out = triton_butterfly_conv(u.float().to(DEVICE), k.float().to(DEVICE)).cpu().double()
    assert (out - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_sizes():
    assert triton_fft_size(1, 1) == 256 and triton_fft_size(1024, 1025) == 2048
    with pytest.raises(ValueError, match="three-pass"):
        triton_fft_size(1024, 1026)
    from kvflow.model.longconv.triton.butterfly import three_pass_factors

    with pytest.raises(ValueError, match="three-pass Triton butterfly takes FFT sizes"):
        three_pass_factors(2048)


def test_triton_method_in_the_model_falls_back_beyond_the_chip():
    """causal_conv's "triton" method: the fused kernel where the FFT fits, the three-pass kernels beyond."""
    from kvflow.model.longconv.conv import causal_conv

    for n in (200, 3000):
        g = torch.Generator().manual_seed(n)
        u, k = torch.randn(1, 2, n, generator=g), torch.randn(2, n, generator=g)
        ref = direct_conv(u.double(), k.double())
        out = causal_conv(u.to(DEVICE), k.to(DEVICE), "triton").cpu().double()
        assert (out - ref).abs().max() <= 2e-5 * ref.abs().max()


@pytest.mark.parametrize("n,taps", [(2049, 2049), (4000, 1000), (5000, 5000)])
def test_three_pass_equals_direct_fp64(n, taps):
    """FFT sizes above 2048: outer column pass, fused inner two-pass sub-rows, outer inverse."""
    from kvflow.model.longconv.triton.butterfly import three_pass_factors, triton_butterfly_conv_three_pass

    g = torch.Generator().manual_seed(n)
    u = torch.randn(1, 3, n, generator=g, dtype=torch.float64)
    k = torch.randn(3, taps, generator=g, dtype=torch.float64)
    ref = direct_conv(u, k)
    out = triton_butterfly_conv_three_pass(u.float().to(DEVICE), k.float().to(DEVICE)).cpu().double()
    assert (out - ref).abs().max() <= 2e-5 * ref.abs().max()
    assert three_pass_factors(4096) == (16, 16, 16) and three_pass_factors(1 << 16) == (64, 32, 32)
