"""Triton kernels for bipolar-INT weights (kvflow/model/quant/bipolar.py): y = x · Wᵀ read straight
from the packed bit planes, never materialising W, not even a tile of it in memory.

W = scale_g · Σ_i 2^i (2B_i − 1) + offset_g per group g of `group_size` along K, so per output tile

    y[m, n] = Σ_g scale_g[n] · (x_g · v_gᵀ)[m, n] + offset_g[n] · Σ x_g[m],   v = Σ_i 2^i (2B_i − 1).

Each program owns a [BLOCK_M, BLOCK_N] output tile and walks the groups (all of K, or its share of
them under split-K): per BLOCK_K tile it loads the plane bytes [BLOCK_N, BLOCK_K/8] of every plane
once, expands each byte's 8 bits in registers to ±1, and multiplies on the tensor cores with
`tl.dot` (fp32 accumulation), then folds in the group's scale and its offset times Σx_g (a row sum
of the same x tile). Activations fp16, bf16 or fp32 (fp32: "tf32x3" dots on Ampere and later, ~1e-6;
"ieee" elsewhere).

What this is, and what it cannot claim. The paper ("Efficient Arbitrary Precision Acceleration for
LLMs on GPU Tensor Cores") gets its speed from *binary* tensor-core MMA (1-bit AND/XOR + popcount,
sm_80's `mma.b1`): n·A binary products cost less than one 16-bit product. Triton exposes no 1-bit
MMA, so here a ±1 plane is a 16-bit (or int8) tile and each plane product costs a full 16-bit (int8)
MMA. Two schedules, both exact in their integer part:

- `planewise=True`, the paper's decomposition as Triton can express it: one `tl.dot` per plane,
  recombined by Horner's rule (acc = 2·acc + x·S_iᵀ from the top plane down), i.e. n MMAs per tile;
- `planewise=False` (the default): the planes are recombined into the odd integers v in registers
  (|v| ≤ 255: exact in fp16, bf16 and tf32), one MMA per tile.

They compute the same sums. Without binary MMA the per-plane schedule only multiplies tensor-core
work by n, so the default recombines; the win this kernel can claim is the memory one (n/16 of
bf16's weight bytes per product, which is what decode is bound by), not the paper's arithmetic one.
`kvflow bench bitplane` measures both schedules against torch's bf16 matmul.

The A-bit variant (`bitplane_linear_abit_triton`) quantises activations per token onto the odd grid
with `bipolar.quantize_activations_bipolar` (in torch: the same codes as the reference), then
multiplies ±1 planes of activations and weights as int8 `tl.dot`s, exact in int32, recombined with
2^(i+j): A·n int8 MMAs per tile, the paper's algorithm with int8 MMA standing in for binary MMA.
The integer dot products and Σx'_g are exact; scales, offsets and the token scale are applied in
fp32 (the reference, `bitplane_linear_abit`, in fp64).

Decode (few rows, few output tiles) is split along K so every SM streams planes: programs write fp32
partial sums that torch adds (deterministic, no atomics). Group sizes must be multiples of 16 (32 for
the A-bit variant: int8 MMA's K); `check_supported` says why not, and callers take the torch path.
`python -m kvflow.model.quant.triton.compile_check` compiles every launch for sm_80/sm_90 without a
GPU (registers, spills, shared memory); speed needs one (`kvflow bench bitplane`, run by .ci/gpu).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvflow.attention.triton._common import device_capability, dot_precision, multiprocessor_count
from kvflow.model.quant import bipolar
from kvflow.model.quant.weights import QuantizedWeight

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _plane_bits(plane_ptrs, n_mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One plane's bytes [BLOCK_N, BLOCK_K / 8] -> its bits [BLOCK_N, BLOCK_K] (int32 0/1), bit j of
    byte c being column 8c + j (bipolar.pack_planes' order)."""
    packed = tl.load(plane_ptrs, mask=n_mask[:, None], other=0).to(tl.int32)
    bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_N, BLOCK_K))


@triton.jit
def _bitplane_kernel(
    x_ptr, planes_ptr, scales_ptr, offsets_ptr, bias_ptr, out_ptr,
    M, N, num_groups, groups_per_split,
    stride_xm, stride_pn, stride_pi, stride_sn, stride_os, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PLANEWISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[split] (fp32 partials, split-K) or out (x's dtype, bias added) for one output tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 8)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    plane_rows = planes_ptr + offs_n[:, None] * stride_pn
    g_start = split * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(g_start, g_end):
        dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # x_g · v_gᵀ
        x_sum = tl.zeros([BLOCK_M], tl.float32)
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            k0 = g * GROUP + kk
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
            x_sum += tl.sum(x.to(tl.float32), axis=1)
            byte_ptrs = plane_rows + (k0 // 8 + offs_kb)[None, :]
            if PLANEWISE:
                for j in tl.static_range(BITS):  # Horner from the top plane: dots = 2·dots + x·S_iᵀ
                    signs = (2 * _plane_bits(byte_ptrs + (BITS - 1 - j) * stride_pi, n_mask, BLOCK_N, BLOCK_K)
                             - 1).to(x.dtype)
                    dots = tl.dot(x, tl.trans(signs), dots * 2.0, input_precision=PRECISION)
            else:
                v = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
                for i in tl.static_range(BITS):
                    v += (2 * _plane_bits(byte_ptrs + i * stride_pi, n_mask, BLOCK_N, BLOCK_K) - 1) << i
                dots = tl.dot(x, tl.trans(v.to(x.dtype)), dots, input_precision=PRECISION)
        scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        offset = tl.load(offsets_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += dots * scale[None, :] + x_sum[:, None] * offset[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _bitplane_abit_kernel(
    u_ptr, sx_ptr, planes_ptr, scales_ptr, offsets_ptr, bias_ptr, out_ptr,
    M, N, num_groups, groups_per_split,
    stride_um, stride_pn, stride_pi, stride_sn, stride_os, stride_om,
    A_BITS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Like `_bitplane_kernel`, from activation codes u (uint8 [M, K], x' = 2u − (2^A − 1)) and their
    token scales: per group the exact int32 x'_g·v_g = Σ_j Σ_i 2^(i+j) (2A_j − 1)·(2B_i − 1)ᵀ."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 8)
    u_rows = u_ptr + offs_m[:, None] * stride_um
    plane_rows = planes_ptr + offs_n[:, None] * stride_pn
    g_start = split * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(g_start, g_end):
        dots = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        x_sum = tl.zeros([BLOCK_M], tl.int32)  # Σ x'_g
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            k0 = g * GROUP + kk
            u = tl.load(u_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0).to(tl.int32)
            x_sum += tl.sum(2 * u - ((1 << A_BITS) - 1), axis=1)
            byte_ptrs = plane_rows + (k0 // 8 + offs_kb)[None, :]
            # Horner over the activation planes, top first: part = 2·part + Σ_i 2^i (2A_j − 1)·(2B_i − 1)ᵀ.
            # A runtime loop, so one activation plane and the n weight planes are live at a time (an
            # unrolled A x n nest keeps every plane of both in registers and spills).
            part = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            for jj in range(A_BITS):
                a_signs = (2 * ((u >> (A_BITS - 1 - jj)) & 1) - 1).to(tl.int8)
                part = part * 2
                for i in tl.static_range(BITS):
                    w_signs = (2 * _plane_bits(byte_ptrs + i * stride_pi, n_mask, BLOCK_N, BLOCK_K) - 1).to(tl.int8)
                    part += tl.dot(a_signs, tl.trans(w_signs), out_dtype=tl.int32) << i
            dots += part
        scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        offset = tl.load(offsets_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += dots.to(tl.float32) * scale[None, :] + x_sum.to(tl.float32)[:, None] * offset[None, :]
    acc *= tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class BitplaneLaunch:
    """Tiles, split-K and launch options of one call; `num_warps`/`num_stages` are ignored by the
    interpreter, `precision` is tl.dot's input_precision (16-bit and int8 inputs ignore it)."""

    block_m: int
    block_n: int
    block_k: int
    groups_per_split: int
    num_splits: int
    num_warps: int
    num_stages: int
    precision: str


def check_supported(qw: QuantizedWeight, x: torch.Tensor, act_bits: int | None = None) -> str | None:
    """Why these kernels cannot run `qw` on `x` (a message), or None when they can."""
    if qw.format != "bipolar":
        return f"the bit-plane kernels run bipolar weights, not {qw.format}"
    group = qw.params["group_size"]
    need = 32 if act_bits is not None else 16  # tl.dot's smallest K (int8: 32)
    if group % need:
        return f"group_size {group} is not a multiple of {need} (tl.dot's K for these inputs)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activations must be fp16, bf16 or fp32, got {x.dtype}"
    return None


def _block_k(group: int, cap: int) -> int:
    """The largest power of two dividing `group`, at most `cap` (tiles never straddle groups)."""
    return min(group & -group, cap)


def launch_config(m: int, n: int, qw: QuantizedWeight, dtype: torch.dtype, device: torch.device,
                  abit: bool = False, num_splits: int | None = None) -> BitplaneLaunch:
    """Output tiles of 64 columns by rows sized to M (16 for decode, up to 128 for prefill; fp32's
    "tf32x3" dots take ~3x the registers, and the A-bit kernel's int32 sums more, so at most 32 rows
    there), and, when those tiles leave SMs idle, the groups
    split so about two programs run per SM. `num_splits` forces a split (tests, benchmarks).
    Under the interpreter (no capability): small tiles, no split unless forced."""
    group = qw.params["group_size"]
    num_groups = qw.shape[1] // group
    capability = device_capability(device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if dtype == torch.float32 or abit:
        block_m = min(block_m, 32)
    block_n = 32 if capability is None else 64  # 128 spills: a tile holds two fp32 accumulators
    block_k = _block_k(group, 64)  # a 128x64 16-bit x tile per pipeline stage: 16 KiB of shared memory
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if num_splits is None:
        sms = multiprocessor_count(device)
        num_splits = 1 if sms is None or programs >= sms else min(num_groups, triton.cdiv(2 * sms, programs))
    per_split = triton.cdiv(num_groups, max(1, min(num_splits, num_groups)))
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    return BitplaneLaunch(block_m, block_n, block_k, per_split, triton.cdiv(num_groups, per_split), num_warps,
                          3, dot_precision(dtype, capability))


def _finish(out: torch.Tensor, cfg: BitplaneLaunch, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Split-K: add the fp32 partials [splits, M, N] (and the bias) and cast; else `out` is final."""
    if cfg.num_splits == 1:
        return out[0]
    y = out.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(dtype)


def _weights(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    planes, scales, offsets = qw.data["planes"], qw.data["scales"], qw.data["offsets"]
    if planes.stride(-1) != 1:
        planes = planes.contiguous()
    if scales.stride(-1) != 1 or offsets.stride() != scales.stride():
        scales, offsets = scales.contiguous(), offsets.contiguous()
    return planes, scales, offsets


def bitplane_linear_triton(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *,
                           planewise: bool = False, num_splits: int | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) -> x · Wᵀ (+ bias) [M, N] in x's dtype, for a bipolar `qw`;
    `bipolar.bitplane_linear` is the torch reference. `planewise`: one MMA per bit plane (see the
    module docstring); `num_splits`: force a split-K."""
    reason = check_supported(qw, x)
    if reason is not None:
        raise ValueError(reason)
    m, k = x.shape
    n = qw.shape[0]
    if k != qw.shape[1]:
        raise ValueError(f"x has {k} columns, the weight {qw.shape[1]}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    planes, scales, offsets = _weights(qw)
    cfg = launch_config(m, n, qw, x.dtype, x.device, num_splits=num_splits)
    out_dtype = x.dtype if cfg.num_splits == 1 else torch.float32
    out = torch.empty(cfg.num_splits, m, n, dtype=out_dtype, device=x.device)
    has_bias = bias is not None and cfg.num_splits == 1
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.num_splits)
    _bitplane_kernel[grid](
        x, planes, scales, offsets, bias if has_bias else out, out,
        m, n, k // qw.params["group_size"], cfg.groups_per_split,
        x.stride(0), planes.stride(0), planes.stride(1), scales.stride(0), out.stride(0), out.stride(1),
        BITS=qw.params["bits"], GROUP=qw.params["group_size"], HAS_BIAS=has_bias, PLANEWISE=planewise,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=cfg.precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _finish(out, cfg, bias, x.dtype)


def bitplane_linear_abit_triton(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, act_bits: int,
                                *, num_splits: int | None = None) -> torch.Tensor:
    """The A-bit variant of `bitplane_linear_triton` (reference: `bipolar.bitplane_linear_abit`):
    activations rounded per token to `act_bits`-bit bipolar codes, ±1 plane products as int8 MMAs."""
    reason = check_supported(qw, x, act_bits)
    if reason is not None:
        raise ValueError(reason)
    if act_bits not in bipolar.BITS:
        raise ValueError(f"bipolar activation bits must be in [2, 8], got {act_bits}")
    m, k = x.shape
    n = qw.shape[0]
    if k != qw.shape[1]:
        raise ValueError(f"x has {k} columns, the weight {qw.shape[1]}")
    u, sx = bipolar.quantize_activations_bipolar(x, act_bits)
    u = u.to(torch.uint8)
    planes, scales, offsets = _weights(qw)
    cfg = launch_config(m, n, qw, x.dtype, x.device, abit=True, num_splits=num_splits)
    out_dtype = x.dtype if cfg.num_splits == 1 else torch.float32
    out = torch.empty(cfg.num_splits, m, n, dtype=out_dtype, device=x.device)
    has_bias = bias is not None and cfg.num_splits == 1
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.num_splits)
    _bitplane_abit_kernel[grid](
        u, sx, planes, scales, offsets, bias if has_bias else out, out,
        m, n, k // qw.params["group_size"], cfg.groups_per_split,
        u.stride(0), planes.stride(0), planes.stride(1), scales.stride(0), out.stride(0), out.stride(1),
        A_BITS=act_bits, BITS=qw.params["bits"], GROUP=qw.params["group_size"], HAS_BIAS=has_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _finish(out, cfg, bias, x.dtype)
