"""The long convolutions agree with the definition computed in fp64, for every length 1…4096."""

from __future__ import annotations

import pytest
import torch

from kvflow.model.longconv.butterfly import butterfly_conv, butterfly_dft, butterfly_plan, split_factors
from kvflow.model.longconv.conv import causal_conv, direct_conv, effective_kernel, fft_conv, smooth, squash

LENGTHS = [1, 2, 3, 5, 7, 16, 17, 31, 64, 100, 127, 255, 256, 257, 511, 1000, 1023, 1024, 1025, 2047, 2048, 3000,
           4095, 4096]


def naive(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[n] = Σ_j k[j]·u[n-j] as a Toeplitz matrix product in fp64: independent of every method here."""
    n = u.shape[-1]
    idx = torch.arange(n)
    lag = idx[:, None] - idx[None, :]  # [n, m]: tap n - m
    taps = torch.nn.functional.pad(k.double(), (0, max(0, n - k.shape[1])))[:, :n]
    toeplitz = torch.where(lag >= 0, taps[:, lag.clamp(min=0)], 0.0)  # [H, n, m]
    return torch.einsum("hnm,...hm->...hn", toeplitz, u.double())


def inputs(n: int, taps: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, n, generator=g, dtype=dtype), torch.randn(3, taps, generator=g, dtype=dtype)


def test_direct_is_the_definition():
    for n, taps in [(1, 1), (9, 4), (40, 40), (33, 100)]:
        u, k = inputs(n, taps)
        torch.testing.assert_close(direct_conv(u, k), naive(u, k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", LENGTHS)
def test_fft_and_butterfly_equal_direct_fp64(n):
    taps = n if n % 3 else max(1, n // 2)  # kernels as long as the input, and shorter ones
    u, k = inputs(n, taps, seed=n)
    ref = direct_conv(u, k)
    scale = ref.abs().max()
    for method in ("fft", "butterfly"):
        assert (causal_conv(u, k, method) - ref).abs().max() <= 1e-12 * scale, method


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 2500, 4096])
def test_fp32_methods_within_rounding_of_fp64(n):
    u, k = inputs(n, n + 3, seed=n)
    ref = direct_conv(u, k)
    for method in ("fft", "butterfly"):
        out = causal_conv(u.float(), k.float(), method)
        assert out.dtype == torch.float32
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), method


@pytest.mark.parametrize("max_factor,passes", [(4096, 1), (128, 2), (16, 3), (4, 6)])
def test_butterfly_any_number_of_passes(max_factor, passes):
    """One pass (a dense DFT), two (N1·N2), three (the long-sequence form) and more agree."""
    n = 1500
    assert len(split_factors(4096, max_factor)) == passes
    u, k = inputs(n, n, seed=3)
    out = butterfly_conv(u, k, max_factor=max_factor)
    torch.testing.assert_close(out, direct_conv(u, k), rtol=0, atol=1e-11 * direct_conv(u, k).abs().max().item())


def test_butterfly_spectrum_is_the_fft_transposed():
    """Two passes leave X[k1 + N1·k2] at [k1, k2]: the FFT in transposed order, which the convolution never undoes."""
    m = 64
    plan = butterfly_plan(m, 8, "cpu", torch.complex128)
    assert plan.factors == (8, 8)
    x = torch.randn(m, dtype=torch.float64)
    ours = butterfly_dft(x, plan).view(8, 8)
    ref = torch.fft.fft(x).view(8, 8).T  # ref[k1, k2] = X[k1 + 8 k2]
    torch.testing.assert_close(ours, ref)


def test_split_factors():
    assert split_factors(1) == (1,)
    assert split_factors(64, 64) == (64,)
    assert split_factors(8192, 64) == (32, 16, 16)
    assert split_factors(65536, 64) == (64, 32, 32)
    for size in (2, 1024, 1 << 17):
        assert torch.tensor(split_factors(size, 32)).prod().item() == size
    with pytest.raises(ValueError, match="power of two"):
        split_factors(96)
    with pytest.raises(ValueError, match="max_factor"):
        split_factors(64, 3)


def test_bad_shapes_and_methods():
    u, k = inputs(8, 8)
    with pytest.raises(ValueError, match=r"u \[..., H, N\] and k \[H, K\]"):
        fft_conv(u, k[:2])
    with pytest.raises(ValueError, match="method must be one of"):
        causal_conv(u, k, "winograd")


def test_squash_zeroes_exactly_what_lambda_covers():
    k = torch.tensor([-0.5, -0.1, -0.0999, 0.0, 0.05, 0.1, 0.1001, 2.0], dtype=torch.float64)
    out = squash(k, 0.1)
    assert (out[k.abs() <= 0.1] == 0).all()
    kept = k.abs() > 0.1
    assert (out[kept] != 0).all()
    torch.testing.assert_close(out[kept], k[kept] - 0.1 * torch.sign(k[kept]))
    assert squash(k, 0.0) is k


def test_smooth_is_a_centred_moving_average():
    k = torch.randn(2, 9, dtype=torch.float64)
    out = smooth(k, 3)
    padded = torch.nn.functional.pad(k, (1, 1))
    torch.testing.assert_close(out, (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3)
    assert smooth(k, 1) is k
    torch.testing.assert_close(effective_kernel(k, 0.2, 3), squash(smooth(k, 3), 0.2))
