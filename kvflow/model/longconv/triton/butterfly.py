"""FlashButterfly for GPUs: the whole FFT convolution of one sequence and channel in one Triton program.

butterfly.py's two-pass form (M = N1·N2, spectra left transposed), fused: a program loads its row of
u as an [N1, N2] tile, and without leaving on-chip memory runs the column DFT (`tl.dot` with the
N1×N1 DFT matrix), the twiddles, the row DFT (with the N2×N2 one), the product with the kernel's
spectrum (precomputed once per kernel by butterfly.py, in the same transposed order), the inverse
row DFT, the conjugate twiddles and the real part of the inverse column DFT, then stores the first
N outputs. Complex products are pairs of real `tl.dot`s in full fp32 ("ieee": TF32 would cost ~3
decimal digits). Every DFT matrix is at least 16×16 (tl.dot's smallest tile), so M >= 256; one
program holds a row in registers, so M <= 2048 (N up to 1,024 with a full-length kernel).

Longer rows take the three-pass form, M = N1·R with R = N2·N3 <= 1024, in three kernels: the
outer column DFT of length N1 with its twiddles (`_outer_forward`, a block of columns per program),
then per (row, k1) the fused two-pass DFT of the length-R sub-row, the product with the kernel's
spectrum and the inverse, complex in and out (`_inner_conv`), then the conjugate twiddles and the
real part of the inverse column DFT (`_outer_inverse`). Between the passes the row lives in global
memory (2 × M complex values per row), once each way: the form for sequences longer than on-chip
memory. M up to 64·1024 = 65,536 (N up to 32,768 with a full-length kernel); beyond, butterfly.py.

Tile sizes come from compiling every launch for sm_90 without a GPU (attention/triton/compile_check's
capture and compile): a program keeps about a dozen fp32 tiles live, so at 64×64 even 32 warps spilled
9–15 KB per program to local memory, while 64×32 tiles spill ~11 KB at 16 warps and 32×32 under 1 KB at
8; hence the limits above. Speed on a GPU is unmeasured (no GPU was available to this work).

Tested on CPU under TRITON_INTERPRET=1 against an fp64 direct convolution.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.model.longconv.butterfly import butterfly_dft, butterfly_plan, plan_from_factors
from kvflow.model.longconv.conv import _check, fft_size

MIN_SIZE, MAX_SIZE = 256, 2048  # the fused kernel's FFT sizes
MAX_INNER = 1024  # the three-pass form's sub-row R = N2·N3
MAX_THREE_PASS = 64 * MAX_INNER
_BLOCK_COLS = 64  # columns of the [N1, R] view an outer-pass program takes


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


@triton.jit
def _outer_forward(u_ptr, br_ptr, bi_ptr, f1r_ptr, f1i_ptr, tr_ptr, ti_ptr, N, N1: tl.constexpr, R: tl.constexpr,
                   BLOCK: tl.constexpr):
    """B[:, cols] = (F_N1 @ A[:, cols]) ⊙ T[:, cols] for the real row A = u[row] viewed [N1, R]."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    r1 = tl.arange(0, N1)
    idx = r1[:, None] * R + cols[None, :]
    a = tl.load(u_ptr + row * N + idx, mask=idx < N, other=0.0)
    f1r = tl.load(f1r_ptr + r1[:, None] * N1 + r1[None, :])
    f1i = tl.load(f1i_ptr + r1[:, None] * N1 + r1[None, :])
    br = tl.dot(f1r, a, input_precision="ieee")
    bi = tl.dot(f1i, a, input_precision="ieee")
    tr = tl.load(tr_ptr + idx)
    ti = tl.load(ti_ptr + idx)
    out = row * N1 * R + idx
    tl.store(br_ptr + out, br * tr - bi * ti)
    tl.store(bi_ptr + out, br * ti + bi * tr)


@triton.jit
def _inner_conv(br_ptr, bi_ptr, kr_ptr, ki_ptr, f2r_ptr, f2i_ptr, f3r_ptr, f3i_ptr, tr_ptr, ti_ptr, H,
                N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr):
    """For sub-row (row, k1) of length R = N2·N3, in place: R times IDFT(DFT(b) ⊙ K[h, k1]) (two passes)."""
    pid = tl.program_id(0)  # row * N1 + k1
    h = (pid // N1) % H
    k1 = pid % N1
    r2 = tl.arange(0, N2)
    r3 = tl.arange(0, N3)
    tile = r2[:, None] * N3 + r3[None, :]
    base = pid * N2 * N3
    ar = tl.load(br_ptr + base + tile)
    ai = tl.load(bi_ptr + base + tile)
    f2r = tl.load(f2r_ptr + r2[:, None] * N2 + r2[None, :])
    f2i = tl.load(f2i_ptr + r2[:, None] * N2 + r2[None, :])
    f3r = tl.load(f3r_ptr + r3[:, None] * N3 + r3[None, :])
    f3i = tl.load(f3i_ptr + r3[:, None] * N3 + r3[None, :])
    tr = tl.load(tr_ptr + tile)
    ti = tl.load(ti_ptr + tile)
    # Column DFT (F2 @ A, complex), twiddles, row DFT (@ F3).
    cr = tl.dot(f2r, ar, input_precision="ieee") - tl.dot(f2i, ai, input_precision="ieee")
    ci = tl.dot(f2r, ai, input_precision="ieee") + tl.dot(f2i, ar, input_precision="ieee")
    dr = cr * tr - ci * ti
    di = cr * ti + ci * tr
    xr = tl.dot(dr, f3r, input_precision="ieee") - tl.dot(di, f3i, input_precision="ieee")
    xi = tl.dot(dr, f3i, input_precision="ieee") + tl.dot(di, f3r, input_precision="ieee")
    kr = tl.load(kr_ptr + (h * N1 + k1) * N2 * N3 + tile)
    ki = tl.load(ki_ptr + (h * N1 + k1) * N2 * N3 + tile)
    yr = xr * kr - xi * ki
    yi = xr * ki + xi * kr
    # Inverse: @ conj(F3), conjugate twiddles, conj(F2) @ .
    er = tl.dot(yr, f3r, input_precision="ieee") + tl.dot(yi, f3i, input_precision="ieee")
    ei = tl.dot(yi, f3r, input_precision="ieee") - tl.dot(yr, f3i, input_precision="ieee")
    gr = er * tr + ei * ti
    gi = ei * tr - er * ti
    zr = tl.dot(f2r, gr, input_precision="ieee") + tl.dot(f2i, gi, input_precision="ieee")
    zi = tl.dot(f2r, gi, input_precision="ieee") - tl.dot(f2i, gr, input_precision="ieee")
    tl.store(br_ptr + base + tile, zr)
    tl.store(bi_ptr + base + tile, zi)


@triton.jit
def _outer_inverse(br_ptr, bi_ptr, y_ptr, f1r_ptr, f1i_ptr, tr_ptr, ti_ptr, N, N1: tl.constexpr, R: tl.constexpr,
                   BLOCK: tl.constexpr):
    """y[row] = Re(conj(F_N1) @ (E ⊙ conj(T))) / M over a block of columns, the first N elements kept."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    r1 = tl.arange(0, N1)
    idx = r1[:, None] * R + cols[None, :]
    er = tl.load(br_ptr + row * N1 * R + idx)
    ei = tl.load(bi_ptr + row * N1 * R + idx)
    tr = tl.load(tr_ptr + idx)
    ti = tl.load(ti_ptr + idx)
    gr = er * tr + ei * ti
    gi = ei * tr - er * ti
    f1r = tl.load(f1r_ptr + r1[:, None] * N1 + r1[None, :])
    f1i = tl.load(f1i_ptr + r1[:, None] * N1 + r1[None, :])
    out = (tl.dot(f1r, gr, input_precision="ieee") + tl.dot(f1i, gi, input_precision="ieee")) / (N1 * R)
    tl.store(y_ptr + row * N + idx, out, mask=idx < N)


def _warps(tile: int) -> int:
    """Warps for a program holding [tile]-element fp32 tiles: about a dozen live at once, so more threads
    for bigger tiles (4 warps for 64x64 spilled ~220 KB per program when compiled for sm_90)."""
    return max(4, min(32, tile // 128))


def three_pass_factors(m: int) -> tuple[int, int, int]:
    """(N1, N2, N3) for an FFT size above MAX_SIZE: N1 >= 16 and R = N2·N3 <= MAX_INNER, each >= 16."""
    if not MAX_SIZE < m <= MAX_THREE_PASS:
        raise ValueError(f"the three-pass Triton butterfly takes FFT sizes in ({MAX_SIZE}, {MAX_THREE_PASS}], got {m}")
    n1 = max(16, m // MAX_INNER)
    r = m // n1
    n2 = 1 << ((r.bit_length() - 1 + 1) // 2)
    return n1, n2, r // n2


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.real.contiguous(), t.imag.contiguous()


def triton_butterfly_conv_three_pass(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`u` [..., H, N] convolved causally with `k` [H, K] by the three-pass kernels (FFT sizes above 2048)."""
    _check(u, k)
    n, h = u.shape[-1], u.shape[-2]
    taps = min(n, k.shape[1])
    m = fft_size(n, taps)
    n1, n2, n3 = three_pass_factors(m)
    r = n2 * n3
    plan = plan_from_factors((n1, n2, n3), str(u.device), torch.complex64)
    spectrum = butterfly_dft(torch.nn.functional.pad(k[:, :taps].float(), (0, m - taps)), plan)
    kr, ki = _split(spectrum)
    rows = u.reshape(-1, n).float().contiguous()
    out = torch.empty_like(rows)
    br = torch.empty(rows.shape[0], m, dtype=torch.float32, device=u.device)
    bi = torch.empty_like(br)
    (f1r, f1i), (f2r, f2i), (f3r, f3i) = (_split(f) for f in plan.dfts)
    (t0r, t0i), (t1r, t1i) = (_split(t) for t in plan.twiddles)
    block = min(_BLOCK_COLS, r)
    grid = (rows.shape[0], r // block)
    outer_warps = _warps(n1 * block)
    _outer_forward[grid](rows, br, bi, f1r, f1i, t0r, t0i, n, N1=n1, R=r, BLOCK=block, num_warps=outer_warps)
    _inner_conv[(rows.shape[0] * n1,)](br, bi, kr, ki, f2r, f2i, f3r, f3i, t1r, t1i, h, N1=n1, N2=n2, N3=n3,
                                       num_warps=_warps(r))
    _outer_inverse[grid](br, bi, out, f1r, f1i, t0r, t0i, n, N1=n1, R=r, BLOCK=block, num_warps=outer_warps)
    return out.view(u.shape).to(u.dtype)


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
        tw.real.contiguous(), tw.imag.contiguous(), h, n, N1=n1, N2=n2, num_warps=_warps(m))
    return out.view(u.shape).to(u.dtype)
