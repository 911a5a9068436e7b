"""Bipolar-INT: n-bit weights (n = 2..8) whose every bit plane means ±1, and bit-plane matmuls.

A code u in [0, 2^n) with bits b_i stands for the odd integer

    v = Σ_i (2 b_i − 1) · 2^i = 2u − (2^n − 1),   v ∈ {−(2^n − 1), …, −1, 1, …, 2^n − 1}

(a grid symmetric about zero, step 2, no zero), and a weight is w = scale · v + offset with one
scale and one offset per group of `group_size` weights along K ("Efficient Arbitrary Precision
Acceleration for LLMs on GPU Tensor Cores": because each plane is ±1, a matmul splits into n binary
matmuls recombined with powers of two, and a binary matmul of ±1 vectors is K − 2·popcount(a ⊕ b)).

Layout (`QuantizedWeight` data, every tensor with N first so row shards concatenate):
  ``planes``  uint8 [N, n, K/8]: plane i of row r, bit j of byte c is b_i of weight 8c + j;
  ``scales``, ``offsets`` [N, K/G]: fp16 where every group's scale is a normal fp16 number (the
  usual case: 16/G bits per weight each), else fp32. params: ``bits``, ``group_size``.
Default group size 64: it divides every width of the shipped models (256, 704; q4_k's 256 does not
divide 704) and costs 0.5 bit per weight in fp16 scale + offset, so 4-bit bipolar is 4.5 bits per
weight like q4_0 and q4_k.

Conversion from signed integers (`from_signed_int`), lossless: a signed n-bit code q ∈ [−2^(n−1),
2^(n−1)) with w = s · (q − z) becomes v = 2q + 1 (u = q + 2^(n−1): the two's-complement bits with
the top bit flipped), scale' = s / 2 and offset' = −s · (z + ½), since s·(q − z) = (s/2)(2q + 1) −
s(z + ½). Halving is exact in binary floating point, so codes and scale carry over exactly; the
offset is computed in fp64 and stored in the source scale's dtype, exact for symmetric sources
(z = 0: offset' = −s/2) and whenever s·(2z + 1)/2 fits that dtype.

Activations for the A-bit variant go onto the same odd grid per token (symmetric: x ≈ sx · x',
sx = max|x| / (2^A − 1)); x'·v products of a group then come from popcounts of plane pairs.
"""

from __future__ import annotations

import torch

from kvflow.model.quant.weights import QuantizedWeight

DEFAULT_GROUP = 64
BITS = range(2, 9)
_FP16_TINY = 6.104e-05  # smallest normal fp16
_FP16_MAX = 65504.0
_POPCOUNT_CHUNK = 1 << 22  # XORed bytes per popcount step
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def check_params(bits: int, group_size: int, in_features: int | None = None) -> None:
    if bits not in BITS:
        raise ValueError(f"bipolar bits must be in [2, 8], got {bits}")
    if group_size < 8 or group_size % 8:
        raise ValueError(f"bipolar group_size must be a positive multiple of 8, got {group_size}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"bipolar group_size {group_size} does not divide in_features {in_features}")


# ---------------------------------------------------------------------------- bits <-> planes
def pack_planes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes u [R, K] (integers in [0, 2^bits)) -> planes uint8 [R, bits, K/8] (LSB-first along K)."""
    r, k = u.shape
    shifts = torch.arange(bits, device=u.device)
    planes = (u.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 1  # [R, bits, K]
    weights = (1 << torch.arange(8, device=u.device)).to(torch.int64)
    return (planes.reshape(r, bits, k // 8, 8) * weights).sum(-1).to(torch.uint8)


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """planes uint8 [R, bits, K/8] -> bits uint8 [R, bits, K] (0 or 1)."""
    shifts = torch.arange(8, device=planes.device, dtype=torch.uint8)
    bits = (planes[..., None] >> shifts) & 1
    return bits.reshape(*planes.shape[:-1], planes.shape[-1] * 8)


def codes_from_planes(planes: torch.Tensor) -> torch.Tensor:
    """planes [R, bits, K/8] -> unsigned codes u int64 [R, K]."""
    b = unpack_planes(planes).to(torch.int64)
    return (b << torch.arange(b.shape[1], device=b.device)[None, :, None]).sum(1)


def odd_values(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes -> their bipolar values 2u − (2^bits − 1)."""
    return 2 * u.to(torch.int64) - ((1 << bits) - 1)


# ---------------------------------------------------------------------------- quantise / dequantise
def _param_dtype(scale: torch.Tensor, offset: torch.Tensor) -> torch.dtype:
    """fp16 when every scale is zero or a normal fp16 number (relative error 2^-11) and no offset
    overflows it; else fp32. (A subnormal offset is off by at most 2^-25, far below any normal scale.)"""
    a = scale.abs()
    if bool(((a > 0) & (a < _FP16_TINY)).any()) or bool((a > _FP16_MAX).any()) or bool(
            (offset.abs() > _FP16_MAX).any()):
        return torch.float32
    return torch.float16


def quantize_bipolar(w: torch.Tensor, bits: int = 4, group_size: int = DEFAULT_GROUP) -> QuantizedWeight:
    """Round to nearest on each group's min/max grid: offset = (max + min)/2, scale = (max − min) /
    (2(2^n − 1)), so ±(2^n − 1) land on the extremes. Codes are chosen against the stored (rounded)
    scale and offset, so rounding the parameters costs nothing beyond itself."""
    n, k = w.shape
    check_params(bits, group_size, k)
    top = (1 << bits) - 1
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    offset, scale = (hi + lo) / 2, (hi - lo) / (2 * top)
    dtype = _param_dtype(scale, offset)
    scale, offset = scale.to(dtype), offset.to(dtype)
    s, o = scale.float()[..., None], offset.float()[..., None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = torch.round(((g - o) / safe + top) / 2).clamp_(0, top)
    u = torch.where(s > 0, u, torch.full_like(u, (top + 1) // 2))  # a constant group: v = 1, scale 0
    planes = pack_planes(u.reshape(n, k).to(torch.int64), bits)
    return QuantizedWeight("bipolar", (n, k), {"planes": planes, "scales": scale, "offsets": offset},
                           {"bits": bits, "group_size": group_size})


def dequantize_bipolar(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = scale · v + offset, computed in `dtype` (fp64 shows conversions exact)."""
    bits, group = qw.params["bits"], qw.params["group_size"]
    n, k = qw.shape
    v = odd_values(codes_from_planes(qw.data["planes"]), bits).to(dtype).reshape(n, k // group, group)
    w = v * qw.data["scales"].to(dtype)[..., None] + qw.data["offsets"].to(dtype)[..., None]
    return w.reshape(n, k)


def from_signed_int(q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                    zeros: torch.Tensor | None = None) -> QuantizedWeight:
    """Signed n-bit codes q [N, K] with w = scales · (q − zeros) per group ([N, K/G] each; zeros
    default 0) -> the same weights in bipolar form, losslessly (see the module docstring)."""
    n, k = q.shape
    check_params(bits, group_size, k)
    half = 1 << (bits - 1)
    q64 = q.to(torch.int64)
    if bool((q64 < -half).any()) or bool((q64 >= half).any()):
        raise ValueError(f"signed {bits}-bit codes must lie in [{-half}, {half - 1}]")
    s64 = scales.to(torch.float64)
    z64 = torch.zeros_like(s64) if zeros is None else zeros.to(torch.float64)
    new_scales = (s64 / 2).to(scales.dtype)
    offsets = (-s64 * (z64 + 0.5)).to(scales.dtype)
    planes = pack_planes(q64 + half, bits)
    return QuantizedWeight("bipolar", (n, k), {"planes": planes, "scales": new_scales, "offsets": offsets},
                           {"bits": bits, "group_size": group_size})


# ---------------------------------------------------------------------------- bit-plane matmuls
def _signs(planes: torch.Tensor, i: int, dtype: torch.dtype) -> torch.Tensor:
    """Plane i of [R, bits, K/8] as ±1 [R, K] in `dtype` (2b − 1)."""
    return unpack_planes(planes[:, i : i + 1])[:, 0].to(dtype) * 2 - 1


def bitplane_matmul_int(x: torch.Tensor, planes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Integer activations x [M, K] against bipolar codes: int64 [M, N, K/G], the per-group dot
    products Σ_i 2^i · (x_g · (2B_i − 1)_g), one binary (±1) matmul per plane."""
    m, k = x.shape
    n, bits = planes.shape[0], planes.shape[1]
    groups = k // group_size
    xg = x.to(torch.int64).reshape(m, groups, group_size).permute(1, 0, 2)  # [G, M, g]
    acc = torch.zeros(groups, m, n, dtype=torch.int64, device=x.device)
    for i in range(bits):
        s = _signs(planes, i, torch.int64).reshape(n, groups, group_size).permute(1, 2, 0)  # [G, g, N]
        acc += torch.bmm(xg, s) << i
    return acc.permute(1, 2, 0)


def bitplane_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] float -> x · wᵀ [M, N]: per group, Σ_i 2^i · x_g (2B_i − 1)_gᵀ, times the group's
    scale, plus its offset times Σ x_g. Accumulates in fp32; dequantises nothing."""
    planes, group = qw.data["planes"], qw.params["group_size"]
    m, k = x.shape
    n, bits = planes.shape[0], planes.shape[1]
    groups = k // group
    xg = x.float().reshape(m, groups, group)
    xt = xg.permute(1, 0, 2)  # [G, M, g]
    acc = torch.zeros(groups, m, n, dtype=torch.float32, device=x.device)
    for i in range(bits):
        s = _signs(planes, i, torch.float32).reshape(n, groups, group).permute(1, 2, 0)  # [G, g, N]
        acc += torch.bmm(xt, s) * float(1 << i)
    scales, offsets = qw.data["scales"].float(), qw.data["offsets"].float()  # [N, G]
    out = torch.einsum("gmn,ng->mn", acc, scales) + xg.sum(-1) @ offsets.t()
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def quantize_activations_bipolar(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric onto the odd grid: x [M, K] -> codes u int64 [M, K], scales fp32 [M]
    with x ≈ scale · (2u − (2^bits − 1))."""
    top = (1 << bits) - 1
    x32 = x.float()
    scales = x32.abs().amax(dim=1) / top
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    u = torch.round((x32 / safe[:, None] + top) / 2).clamp_(0, top).to(torch.int64)
    return u, scales


def popcount_matmul(a_planes: torch.Tensor, w_planes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bipolar activations x' (planes [M, A, K/8]) against bipolar weights v (planes [N, n, K/8]):
    int64 [M, N, K/G], the per-group x'·v = Σ_j Σ_i 2^(i+j) · (g − 2·popcount(a_j ⊕ b_i))."""
    m, a_bits, kb = a_planes.shape
    n, w_bits = w_planes.shape[0], w_planes.shape[1]
    per_group = group_size // 8
    groups = kb // per_group
    lut = _POPCOUNT.to(a_planes.device)
    acc = torch.zeros(m, n, groups, dtype=torch.int64, device=a_planes.device)
    for j in range(a_bits):
        a = a_planes[:, j][:, None, :]  # [M, 1, K/8]
        for i in range(w_bits):
            diff = lut[(a ^ w_planes[:, i][None]).long()]  # [M, N, K/8] differing bits per byte
            ones = diff.reshape(m, n, groups, per_group).sum(-1)
            acc += (group_size - 2 * ones) << (i + j)
    return acc


def plane_sums(planes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Σ of the bipolar values over each group, from popcounts: [R, K/G] int64."""
    r, bits, kb = planes.shape
    ones = _POPCOUNT.to(planes.device)[planes.long()].reshape(r, bits, kb // (group_size // 8), -1).sum(-1)
    weights = (1 << torch.arange(bits, device=planes.device))[None, :, None]
    return ((2 * ones - group_size) * weights).sum(1)


def bitplane_linear_abit(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None,
                         act_bits: int) -> torch.Tensor:
    """The A-bit variant: activations rounded per token to A-bit bipolar codes, then every product
    is a popcount of two bit planes. y = sx · Σ_g (scale_g · x'_g·v_g + offset_g · Σ x'_g)."""
    group, planes = qw.params["group_size"], qw.data["planes"]
    u, sx = quantize_activations_bipolar(x, act_bits)
    a_planes = pack_planes(u, act_bits)
    rows = max(1, _POPCOUNT_CHUNK // max(1, planes.shape[0] * planes.shape[2]))  # bounds the XOR temporaries
    dots = torch.cat([popcount_matmul(a_planes[i : i + rows], planes, group)
                      for i in range(0, a_planes.shape[0], rows)]).double()  # [M, N, G]
    x_sums = plane_sums(a_planes, group).double()  # [M, G]
    scales, offsets = qw.data["scales"].double(), qw.data["offsets"].double()
    out = (dots * scales[None]).sum(-1) + x_sums @ offsets.t()
    out = (out * sx.double()[:, None]).to(x.dtype)
    return out if bias is None else out + bias
