"""Causal long convolutions, per channel: the kernel regularisers and three ways to compute them.

    y[c, n] = sum_{j=0}^{min(n, K-1)} k[c, j] · u[c, n - j]        u: [..., H, N], k: [H, K]

`direct_conv` is the definition, O(N·K): the reference the others are tested against (in fp64).
`fft_conv` zero-pads both to an FFT size of at least N + K - 1 (so the circular convolution the FFT
computes has no wrap-around) and multiplies spectra: O(N log N) with torch.fft.
`butterfly_conv` (butterfly.py) computes the same FFTs as dense matrix products (FlashButterfly);
"triton" runs them in Triton (triton/butterfly.py): fused in one GPU program per row where the FFT
fits on chip (N + K - 1 <= 2048), in three kernels (the three-pass form) up to 65,536, and by
butterfly.py's matmuls beyond.

The kernel a layer applies is its learned one smoothed and squashed (`effective_kernel`); a model
computes that once after loading, since neither depends on the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_METHODS = ("fft", "butterfly", "direct", "triton")


def squash(k: torch.Tensor, lam: float) -> torch.Tensor:
    """Soft thresholding, k <- sign(k)·max(|k| - λ, 0): exactly zero where |k| <= λ, which keeps the
    learned kernel sparse and smooth (the paper's regulariser; λ = 0 is the identity)."""
    if lam == 0:
        return k
    return torch.sign(k) * torch.clamp(k.abs() - lam, min=0)


def smooth(k: torch.Tensor, width: int) -> torch.Tensor:
    """A centred moving average of `width` taps along the kernel (zero beyond its ends); 1: none."""
    if width == 1:
        return k
    return F.avg_pool1d(k.unsqueeze(1), width, stride=1, padding=width // 2, count_include_pad=True).squeeze(1)


def effective_kernel(k: torch.Tensor, lam: float, width: int) -> torch.Tensor:
    """What a layer convolves with: its learned kernel smoothed, then squashed."""
    return squash(smooth(k, width), lam)


def _check(u: torch.Tensor, k: torch.Tensor) -> None:
    if u.dim() < 2 or k.dim() != 2 or u.shape[-2] != k.shape[0]:
        raise ValueError(f"a long convolution takes u [..., H, N] and k [H, K]; got {tuple(u.shape)} and "
                         f"{tuple(k.shape)}")
    if k.shape[1] < 1:
        raise ValueError("a long-convolution kernel needs at least one tap")


def direct_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The definition, one shifted multiply-add per tap (O(N·K)): the reference."""
    _check(u, k)
    n = u.shape[-1]
    y = torch.zeros_like(u)
    for j in range(min(n, k.shape[1])):
        y[..., j:] += k[:, j : j + 1] * u[..., : n - j]
    return y


def fft_size(n: int, taps: int) -> int:
    """The power of two at least n + taps - 1: long enough that the circular convolution is linear."""
    return 1 << max(0, n + taps - 2).bit_length()


def fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """By torch's real FFT, in fp32 (or fp64 for fp64 inputs); the output has u's dtype."""
    _check(u, k)
    n = u.shape[-1]
    taps = min(n, k.shape[1])
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    m = fft_size(n, taps)
    spectrum = torch.fft.rfft(u.to(work), n=m) * torch.fft.rfft(k[:, :taps].to(work), n=m)
    return torch.fft.irfft(spectrum, n=m)[..., :n].to(u.dtype)


def causal_conv(u: torch.Tensor, k: torch.Tensor, method: str = "fft") -> torch.Tensor:
    """`u` [..., H, N] convolved with `k` [H, K] by `method` (one of CONV_METHODS)."""
    if method == "fft":
        return fft_conv(u, k)
    if method == "butterfly":
        from kvflow.model.longconv.butterfly import butterfly_conv

        return butterfly_conv(u, k)
    if method == "direct":
        return direct_conv(u, k)
    if method == "triton":
        from kvflow.model.longconv.triton import butterfly as tb

        m = fft_size(u.shape[-1], min(u.shape[-1], k.shape[1]))
        if m <= tb.MAX_SIZE:
            return tb.triton_butterfly_conv(u, k)
        if m <= tb.MAX_THREE_PASS:
            return tb.triton_butterfly_conv_three_pass(u, k)
        from kvflow.model.longconv.butterfly import butterfly_conv

        return butterfly_conv(u, k)
    raise ValueError(f"long-conv method must be one of {', '.join(CONV_METHODS)}, got {method!r}")
