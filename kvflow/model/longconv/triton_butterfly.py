"""FlashButterfly for GPUs: the whole FFT convolution of one sequence and channel in one Triton program.

butterfly.py's two-pass form (M = N1·N2, spectra left transposed), fused: a program loads its row of
u as an [N1, N2] tile, and without leaving on-chip memory runs the column DFT (`tl.dot` with the
N1×N1 DFT matrix), the twiddles, the row DFT (with the N2×N2 one), the product with the kernel's
spectrum (precomputed once per kernel by butterfly.py, in the same transposed order), the inverse
row DFT, the conjugate twiddles and the real part of the inverse column DFT, then stores the first
N outputs. Complex products are pairs of real `tl.dot`s in full fp32 ("ieee": TF32 would cost ~3
decimal digits). Every DFT matrix is at least 16×16 (tl.dot's smallest tile), so M >= 256; one
program holds a row in registers, so M <= 4096 (N up to 2,048 with a full-length kernel). Longer
sequences take the three-pass form in butterfly.py.

Tested on CPU under TRITON_INTERPRET=1 against an fp64 direct convolution.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.model.longconv.butterfly import butterfly_dft, butterfly_plan
from kvflow.model.longconv.conv import _check, fft_size

MIN_SIZE, MAX_SIZE = 256, 4096


@triton.jit
def _conv_kernel(u_ptr, y_ptr, kr_ptr, ki_ptr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, H, N,
                 N1: tl.constexpr, N2: tl.constexpr):
    row = tl.program_id(0)  # one (batch, channel) row of u
    h = row % H
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    tile = r1[:, None] * N2 + r2[None, :]  # element n = N2·n1 + n2 of the row, and frequency slot [k1, k2]
    a = tl.load(u_ptr + row * N + tile, mask=tile < N, other=0.0)
    f1r = tl.load(f1r_ptr + r1[:, None] * N1 + r1[None, :])
    f1i = tl.load(f1i_ptr + r1[:, None] * N1 + r1[None, :])
    f2r = tl.load(f2r_ptr + r2[:, None] * N2 + r2[None, :])
    f2i = tl.load(f2i_ptr + r2[:, None] * N2 + r2[None, :])
    tr = tl.load(tr_ptr + tile)
    ti = tl.load(ti_ptr + tile)
    # Column DFT of the real tile, then the twiddles.
    br = tl.dot(f1r, a, input_precision="ieee")
    bi = tl.dot(f1i, a, input_precision="ieee")
    cr = br * tr - bi * ti
    ci = br * ti + bi * tr
    # Row DFT: X = C @ F2.
    xr = tl.dot(cr, f2r, input_precision="ieee") - tl.dot(ci, f2i, input_precision="ieee")
    xi = tl.dot(cr, f2i, input_precision="ieee") + tl.dot(ci, f2r, input_precision="ieee")
    # Times the kernel's spectrum (same transposed order).
    kr = tl.load(kr_ptr + h * N1 * N2 + tile)
    ki = tl.load(ki_ptr + h * N1 * N2 + tile)
    yr = xr * kr - xi * ki
    yi = xr * ki + xi * kr
    # Inverse row DFT: D = Y @ conj(F2).
    dr = tl.dot(yr, f2r, input_precision="ieee") + tl.dot(yi, f2i, input_precision="ieee")
    di = tl.dot(yi, f2r, input_precision="ieee") - tl.dot(yr, f2i, input_precision="ieee")
    # Conjugate twiddles, then the real part of conj(F1) @ E.
    er = dr * tr + di * ti
    ei = di * tr - dr * ti
    out = (tl.dot(f1r, er, input_precision="ieee") + tl.dot(f1i, ei, input_precision="ieee")) / (N1 * N2)
    tl.store(y_ptr + row * N + tile, out, mask=tile < N)


def triton_fft_size(n: int, taps: int) -> int:
    """The fused kernel's FFT size: butterfly's, at least MIN_SIZE; ValueError above MAX_SIZE."""
    m = max(MIN_SIZE, fft_size(n, taps))
    if m > MAX_SIZE:
        raise ValueError(f"the fused Triton butterfly holds one row on chip: FFT size <= {MAX_SIZE} (N + K - 1 <= "
                         f"{MAX_SIZE}), got {m} for N={n}, K={taps}; use butterfly_conv's three-pass form")
    return m


def kernel_spectrum(k: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's spectrum (real, imaginary: [H, M] fp32) in the two-pass plan's transposed order."""
    n1 = 1 << ((m.bit_length() - 1 + 1) // 2)
    plan = butterfly_plan(m, n1, str(k.device), torch.complex64)
    padded = torch.nn.functional.pad(k.float(), (0, m - k.shape[1]))
    spectrum = butterfly_dft(padded, plan)
    return spectrum.real.contiguous(), spectrum.imag.contiguous()


def triton_butterfly_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`u` [..., H, N] convolved causally with `k` [H, K] by the fused kernel (fp32); the output has u's dtype."""
    _check(u, k)
    n, h = u.shape[-1], u.shape[-2]
    taps = min(n, k.shape[1])
    m = triton_fft_size(n, taps)
    n1 = 1 << ((m.bit_length() - 1 + 1) // 2)
    n2 = m // n1
    plan = butterfly_plan(m, n1, str(u.device), torch.complex64)
    assert plan.factors == (n1, n2)
    kr, ki = kernel_spectrum(k[:, :taps], m)
    rows = u.reshape(-1, n).float().contiguous()
    out = torch.empty_like(rows)
    f1, f2, tw = plan.dfts[0], plan.dfts[1], plan.twiddles[0]
    _conv_kernel[(rows.shape[0],)](
        rows, out, kr, ki, f1.real.contiguous(), f1.imag.contiguous(), f2.real.contiguous(), f2.imag.contiguous(),
        tw.real.contiguous(), tw.imag.contiguous(), h, n, N1=n1, N2=n2)
    return out.view(u.shape).to(u.dtype)
