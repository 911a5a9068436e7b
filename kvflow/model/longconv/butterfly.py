"""FlashButterfly: the FFT convolution written as dense matrix products.

A length-M DFT with M = N1·N2 (Cooley–Tukey's four-step form, as in FlashFFTConv / "Simple
Hardware-Efficient Long Convolutions") is, viewing the input as a row-major [N1, N2] matrix A:

    B = F_N1 @ A              a DFT of length N1 down each column (one dense matmul)
    B = B ⊙ T,  T[k1, n2] = ω_M^(n2·k1)      the twiddle factors
    X = B @ F_N2              a DFT of length N2 along each row

and X[k1, k2] is the transform at frequency k1 + N1·k2: the spectrum comes out transposed. A
convolution never needs it in natural order (it multiplies two spectra in the same order and
transforms back), so the transposes of the textbook algorithm are simply dropped. The inverse runs
the same steps backwards with conjugates, and its output is back in natural order.

For long sequences the row DFT (length N2) is itself split the same way, recursively: M = N1·N2·N3
gives the three-pass form (three matmul passes, two twiddle multiplies), which keeps every DFT
matrix small (at most `max_factor`, a few KiB) so each pass streams the data once through fast
memory. The factors of a plan are as even as possible: the work per element is their sum (dense
DFTs of size N_i), against log2(M) radix-2 steps for an FFT — more arithmetic, all of it in matmuls.

Inputs and outputs are real, which `butterfly_conv` uses to halve the work: two channels ride one
complex sequence (z = u_a + i·u_b, "two real FFTs for one"), and their spectra are told apart by
U_a = (Z + conj(Z(-f)))/2, U_b = (Z - conj(Z(-f)))/2i, where Z(-f) is a fixed gather in the plan's
transposed order (`ButterflyPlan.negate`). The pair's outputs come back as the real and imaginary
parts of one inverse DFT. (`butterfly_idft_real` is the unpaired inverse: the real part of its last
pass takes two real matmuls.) Sizes are powers of two at least N + K - 1 (any N is zero-padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from kvflow.model.longconv.conv import _check, fft_size

#: The largest DFT matrix a pass multiplies by (a power of two). Chosen by `kvflow bench longconv`.
DEFAULT_MAX_FACTOR = 64


@dataclass(frozen=True)
class ButterflyPlan:
    """The factors of one FFT size and, per pass, its DFT matrix and twiddles (complex)."""

    size: int
    factors: tuple[int, ...]
    dfts: tuple[torch.Tensor, ...]  # F_Ni [Ni, Ni], F[n, k] = ω_Ni^(n·k)
    twiddles: tuple[torch.Tensor, ...]  # per pass but the last: [Ni, Ni+1·…·Nlast]
    negate: torch.Tensor  # [M]: where the frequency -f of the frequency at each position sits


def frequency_order(factors: tuple[int, ...]) -> torch.Tensor:
    """The frequency at each position of `butterfly_dft`'s output: position k1·(M/N1) + q holds
    k1 + N1·f_rest(q), recursively (k1 + N1·k2 for two passes)."""
    order = torch.arange(factors[-1])
    for f in reversed(factors[:-1]):
        order = (torch.arange(f)[:, None] + f * order[None, :]).reshape(-1)
    return order


def split_factors(size: int, max_factor: int = DEFAULT_MAX_FACTOR) -> tuple[int, ...]:
    """Powers of two as even as possible, each <= max_factor, whose product is `size` (a power of two)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a butterfly FFT size must be a power of two, got {size}")
    if max_factor < 2 or max_factor & (max_factor - 1):
        raise ValueError(f"max_factor must be a power of two >= 2, got {max_factor}")
    bits, cap = size.bit_length() - 1, max_factor.bit_length() - 1
    passes = max(1, math.ceil(bits / cap))
    base, extra = divmod(bits, passes)
    return tuple(1 << (base + (1 if i < extra else 0)) for i in range(passes))


def dft_matrix(n: int, dtype: torch.dtype, device: torch.device | str = "cpu", inverse: bool = False) -> torch.Tensor:
    """F[j, k] = exp(∓2πi·j·k / n), computed in fp64 (indices reduced mod n) and cast."""
    idx = torch.arange(n, dtype=torch.int64)
    phase = (torch.outer(idx, idx) % n).double() * (2 * math.pi / n)
    sign = 1.0 if inverse else -1.0
    return torch.polar(torch.ones_like(phase), sign * phase).to(device=device, dtype=dtype)


def _twiddles(n1: int, rest: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """T[k1, n2] = ω_{n1·rest}^(n2·k1)."""
    k1 = torch.arange(n1, dtype=torch.int64)[:, None]
    n2 = torch.arange(rest, dtype=torch.int64)[None, :]
    phase = ((k1 * n2) % (n1 * rest)).double() * (-2 * math.pi / (n1 * rest))
    return torch.polar(torch.ones_like(phase), phase).to(device=device, dtype=dtype)


def butterfly_plan(size: int, max_factor: int = DEFAULT_MAX_FACTOR, device: str = "cpu",
                   dtype: torch.dtype = torch.complex64) -> ButterflyPlan:
    """The plan of an FFT size with factors as even as possible, each <= max_factor."""
    return plan_from_factors(split_factors(size, max_factor), device, dtype)


@lru_cache(maxsize=64)
def plan_from_factors(factors: tuple[int, ...], device: str = "cpu",
                      dtype: torch.dtype = torch.complex64) -> ButterflyPlan:
    """The plan of the FFT of size prod(factors), passes in that order (powers of two)."""
    size = math.prod(factors)
    if size & (size - 1):
        raise ValueError(f"butterfly factors must be powers of two, got {factors}")
    dfts = tuple(dft_matrix(f, dtype, device) for f in factors)
    twiddles, rest = [], size
    for f in factors[:-1]:
        rest //= f
        twiddles.append(_twiddles(f, rest, dtype, device))
    freq = frequency_order(factors)
    position = torch.empty_like(freq)
    position[freq] = torch.arange(size)
    negate = position[(-freq) % size].to(device)
    return ButterflyPlan(size, factors, dfts, tuple(twiddles), negate)


def _left(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F @ x over x's second-to-last dim; a real x takes two real products."""
    if x.is_complex():
        return torch.matmul(f, x)
    return torch.complex(torch.matmul(f.real, x), torch.matmul(f.imag, x))


def _right(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        return torch.matmul(x, f)
    return torch.complex(torch.matmul(x, f.real), torch.matmul(x, f.imag))


def butterfly_dft(x: torch.Tensor, plan: ButterflyPlan, level: int = 0) -> torch.Tensor:
    """The DFT of x [..., M] along its last dim, in the plan's (transposed) frequency order."""
    f = plan.dfts[level]
    if level == len(plan.factors) - 1:
        return _right(x, f)  # F is symmetric: x @ F is the DFT of each row
    n1 = plan.factors[level]
    a = x.reshape(*x.shape[:-1], n1, x.shape[-1] // n1)
    b = _left(f, a) * plan.twiddles[level]
    return butterfly_dft(b, plan, level + 1).reshape(x.shape)


def butterfly_idft_real(x: torch.Tensor, plan: ButterflyPlan, level: int = 0) -> torch.Tensor:
    """M times the inverse of `butterfly_dft`, for spectra of real signals: the real signal [..., M]."""
    f = plan.dfts[level].conj()
    last = level == len(plan.factors) - 1
    if last and level > 0:
        return torch.matmul(x, f)
    if last:  # a one-pass plan: the real part of x @ conj(F) takes two real products
        return torch.matmul(x.real, f.real) - torch.matmul(x.imag, f.imag)
    n1 = plan.factors[level]
    c = x.reshape(*x.shape[:-1], n1, x.shape[-1] // n1)
    d = butterfly_idft_real(c, plan, level + 1) * plan.twiddles[level].conj()
    if level > 0:
        return torch.matmul(f, d).reshape(x.shape)
    return (torch.matmul(f.real, d.real) - torch.matmul(f.imag, d.imag)).reshape(x.shape)


def butterfly_idft(x: torch.Tensor, plan: ButterflyPlan, level: int = 0) -> torch.Tensor:
    """M times the inverse of `butterfly_dft` (complex in, complex out, natural order)."""
    f = plan.dfts[level].conj()
    if level == len(plan.factors) - 1:
        return torch.matmul(x, f)
    n1 = plan.factors[level]
    c = x.reshape(*x.shape[:-1], n1, x.shape[-1] // n1)
    d = butterfly_idft(c, plan, level + 1) * plan.twiddles[level].conj()
    return torch.matmul(f, d).reshape(x.shape)


def _paired_spectrum(x: torch.Tensor, plan: ButterflyPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """For real rows x [..., 2P, M]: Z, the DFT of rows 2p + i·rows 2p+1, and conj(Z(-f)) ([..., P, M] each)."""
    z = butterfly_dft(torch.complex(x[..., 0::2, :], x[..., 1::2, :]), plan)
    return z, z[..., plan.negate].conj()


def butterfly_conv(u: torch.Tensor, k: torch.Tensor, max_factor: int = DEFAULT_MAX_FACTOR) -> torch.Tensor:
    """`u` [..., H, N] convolved causally with `k` [H, K] through FlashButterfly DFTs (fp32, or fp64 for fp64
    inputs), two channels per complex DFT; the output has u's dtype."""
    _check(u, k)
    n, h = u.shape[-1], u.shape[-2]
    taps = min(n, k.shape[1])
    m = fft_size(n, taps)
    real = torch.float64 if u.dtype == torch.float64 else torch.float32
    plan = butterfly_plan(m, max_factor, str(u.device), torch.complex128 if real == torch.float64 else torch.complex64)
    odd = h % 2  # an odd channel count gets a zero channel to pair with
    u_pad = torch.nn.functional.pad(u.to(real), (0, m - n, 0, odd))
    k_pad = torch.nn.functional.pad(k[:, :taps].to(real), (0, m - taps, 0, odd))
    z, z_neg = _paired_spectrum(u_pad, plan)
    kz, kz_neg = _paired_spectrum(k_pad, plan)
    k_a, k_b = (kz + kz_neg) / 2, (kz - kz_neg) * -0.5j  # each channel's own kernel spectrum
    # The pair's output spectrum Y_a + i·Y_b = U_a·K_a + i·U_b·K_b, with U_a, U_b from Z as above:
    w = z * ((k_a + k_b) / 2) + z_neg * ((k_a - k_b) / 2)
    y = butterfly_idft(w, plan)[..., :n] / m  # [..., H/2, N]: y_a + i·y_b
    out = torch.stack((y.real, y.imag), dim=-2).reshape(*u.shape[:-2], h + odd, n)
    return out[..., :h, :].to(u.dtype)
