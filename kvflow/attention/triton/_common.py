"""Helpers shared by the Triton attention kernels: the K/V tile load through a block table and the
online-softmax step (both `@triton.jit`), the wrappers' input checks, and the launch configuration
(tile sizes, warps, pipeline stages) each kernel uses on a given GPU.

A layer's cache is one tensor (dense), an int8 `(codes, scales)` pair or an fp8_e4m3 `(codes,
head_scales)` pair (kv_quant.py). The kernels convert the codes in registers (exactly, in any float
dtype) and fold the scales in, so no dequantised copy of the cache is made, not even of a tile:
int8's per-token scales multiply each key's score column and each value's softmax weight; fp8's
per-head scales are one number per program, folded into the scores' scale (keys) and into the
output (values).

fp8 codes reach the kernels as bytes (a uint8 view). Where the GPU converts fp8 natively (sm_89 and
later: `cvt` between e4m3 and f16/f32) the kernels use Triton's float8e4nv conversions (FP8_NATIVE);
elsewhere, and under the interpreter (whose fp32 -> fp8 conversion does not round to nearest even),
they encode and decode the bits with integer arithmetic, which gives the same values."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvflow.attention import kv_quant
from kvflow.attention.kv_spec import LayerKV

LOG2E = 1.0 / math.log(2.0)  # scores are kept in log2 units so the kernels can use exp2
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The kinds of layer cache `split_cache` tells apart.
DENSE, INT8, FP8 = "dense", "int8", "fp8"
FP8_MAX = tl.constexpr(kv_quant.FP8_MAX)  # largest finite float8_e4m3fn


@triton.jit
def fp8e4m3_to_fp32(codes):
    """float8_e4m3fn bytes (uint8) -> fp32 by integer arithmetic, exact for every finite code (the
    NaN codes 0x7f/0xff read as +-480). Exponent and mantissa bits go to the top of an fp32's
    exponent and mantissa fields, the sign to its sign bit: a normal code (exponent field e > 0)
    then reads 2^(e-127) * 1.m, a subnormal one (e = 0) the fp32 subnormal m * 2^-129, and one
    multiplication by 2^120 makes them 2^(e-7) * 1.m and m * 2^-9, the code's values. (The
    multiplication must keep fp32 subnormals: Triton's is not flush-to-zero, nor is the
    interpreter's.)"""
    c = codes.to(tl.int32)
    bits = ((c & 0x80) << 24) | ((c & 0x7F) << 20)  # sign bit | exponent and mantissa bits
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120


@triton.jit
def fp32_to_fp8e4m3(y):
    """fp32 y with |y| <= 448 -> float8_e4m3fn bytes (uint8), rounded to nearest even by integer
    arithmetic (as PyTorch's `.to(torch.float8_e4m3fn)`), subnormals included. |y| >= 2^-6 (fp32
    exponent field >= 121) is a normal code: rebias the exponent by -120 and round away the 20 low
    mantissa bits, a carry moving into the exponent; below it the code is round(|y| / 2^-9), the
    24-bit significand shifted right by 141 - exponent field (capped: values under 2^-10 give 0)."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    e = a >> 23
    rebased = a - (120 << 23)
    normal = (rebased + 0x7FFFF + ((rebased >> 20) & 1)) >> 20
    shift = tl.minimum(tl.maximum(141 - e, 1), 31)
    m = (a & 0x7FFFFF) | 0x800000
    sub = (m + ((1 << (shift - 1)) - 1) + ((m >> shift) & 1)) >> shift
    return (tl.where(e >= 121, normal, sub) | sign).to(tl.uint8)


@triton.jit
def codes_to(x, dtype: tl.constexpr, FP8: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """A K/V tile as the cache holds it (dense values, int8 codes, or fp8 codes as bytes) in `dtype`,
    exactly for the codes."""
    if FP8:
        if FP8_NATIVE:
            y = x.to(tl.float8e4nv, bitcast=True).to(dtype)
        else:
            y = fp8e4m3_to_fp32(x).to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def load_head_scales(scale_base, stride_skv, FP8: tl.constexpr):
    """fp8: the (key, value) scales of the kv head `scale_base` points at; else (1, 1), unread."""
    if FP8:
        k_scale = tl.load(scale_base)
        v_scale = tl.load(scale_base + stride_skv)
    else:
        k_scale = 1.0
        v_scale = 1.0
    return k_scale, v_scale


@triton.jit
def load_kv_tile(kv_base, scale_base, bt_row, offs_n, n_mask, offs_d, block_size, stride_ckv, stride_cblk, stride_coff,
                 stride_skv, stride_sblk, stride_soff, INT8: tl.constexpr):
    """Keys and values at positions `offs_n` of one sequence and kv head, read through its block
    table row `bt_row` (`kv_base`, `scale_base` already point at the kv head); masked-off rows read
    as 0. Returns (k, v, k_scale, v_scale): for an int8 cache (INT8) k, v are the codes and the
    scales the tokens' fp32 scales [N]; for a dense cache the scales are ones that no one reads
    (a jit function cannot return None), compiled away."""
    blk = tl.load(bt_row + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
    slot = offs_n % block_size
    kv_ptrs = kv_base + (blk * stride_cblk + slot * stride_coff)[:, None] + offs_d[None, :]
    k = tl.load(kv_ptrs, mask=n_mask[:, None], other=0.0)
    v = tl.load(kv_ptrs + stride_ckv, mask=n_mask[:, None], other=0.0)
    if INT8:
        scale_ptrs = scale_base + blk * stride_sblk + slot * stride_soff
        k_scale = tl.load(scale_ptrs, mask=n_mask, other=0.0)
        v_scale = tl.load(scale_ptrs + stride_skv, mask=n_mask, other=0.0)
    else:
        k_scale = tl.full(offs_n.shape, 1.0, tl.float32)
        v_scale = k_scale
    return k, v, k_scale, v_scale


@triton.jit
def tile_scores(q, k, k_scale, qk_scale, INT8: tl.constexpr, FP8: tl.constexpr, FP8_NATIVE: tl.constexpr,
                PRECISION: tl.constexpr):
    """Scores of a query tile against a key tile, in log2 units: q . k * qk_scale, times each key's
    scale for an int8 cache (its codes convert to q's dtype exactly; an fp8 cache's head scale is
    in qk_scale)."""
    s = tl.dot(q, tl.trans(codes_to(k, q.dtype, FP8, FP8_NATIVE)), input_precision=PRECISION) * qk_scale
    if INT8:
        s = s * k_scale[None, :]
    return s


@triton.jit
def online_softmax_step(s, v, v_scale, m_i, l_i, acc, INT8: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the FlashAttention-2 recurrence. `s`: scores in log2 units, -inf where not
    visible; `v`: the values in q's dtype (with INT8, codes converted exactly, with their scales
    `v_scale`). Returns the new running max, running sum and unnormalised accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if INT8:  # sum_j p_j v_j = sum_j (p_j * scale_j) code_j
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


def check_head_dim(head_dim: int) -> None:
    """tl.dot needs power-of-two tiles of at least 16 along the contraction; we do not pad."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"Triton attention needs head_dim a power of two in [16, 256], got {head_dim}")


def dot_precision(dtype: torch.dtype, capability: tuple[int, int] | None) -> str:
    """16-bit inputs ignore this. fp32 needs fp32 accuracy (greedy outputs must match the CPU's):
    on tensor-core GPUs "tf32x3" (three tf32 products, error ~1e-6), because a plain-FMA ("ieee")
    dot at attention's tile sizes spills hundreds of registers; elsewhere exact "ieee"."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if capability is not None and capability >= (8, 0) else "ieee"


def split_cache(kv_cache: LayerKV) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """A layer's cache as (keys/values, None, DENSE) when dense; (codes, scales, INT8) when int8:
    codes [2, blocks, KVH, block_size, D] int8 and scales [2, blocks, KVH, block_size, 1] fp32; or
    (codes as uint8, head_scales, FP8) when fp8: codes [2, blocks, KVH, block_size, D]
    float8_e4m3fn, viewed as their bytes, and head_scales [2, KVH, 1] fp32."""
    if isinstance(kv_cache, torch.Tensor):
        return kv_cache, None, DENSE
    codes, scales = kv_cache
    if codes.dtype == torch.float8_e4m3fn:
        if scales.dtype != torch.float32 or scales.shape != (2, codes.shape[2], 1):
            raise ValueError(f"an fp8 KV cache is (float8_e4m3fn codes, fp32 head scales [2, kv_heads, 1]), got "
                             f"{tuple(codes.shape)} and {scales.dtype} {tuple(scales.shape)}")
        return codes.view(torch.uint8), scales, FP8
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or scales.shape != (*codes.shape[:4], 1):
        raise ValueError(f"an int8 KV cache is (int8 codes, fp32 scales [.., 1]), got {codes.dtype} "
                         f"{tuple(codes.shape)} and {scales.dtype} {tuple(scales.shape)}")
    return codes, scales, INT8


def cache_pointers(kv: torch.Tensor, scales: torch.Tensor | None, kind: str) -> tuple:
    """The kernels' cache arguments: the keys/values (or codes) and the scales (a dense cache passes
    itself, never read), then their (half, block, kv head, slot) strides (the scales' 0 when dense;
    fp8's head scales have no block or slot, strides 0)."""
    if kind == FP8:
        scale_strides = (scales.stride(0), 0, scales.stride(1), 0)
    else:
        scale_strides = scales.stride()[:4] if scales is not None else (0, 0, 0, 0)
    return (kv, kv if scales is None else scales, *kv.stride()[:4], *scale_strides)


def fp8_native(capability: tuple[int, int] | None) -> bool:
    """Whether the kernels convert fp8 with the GPU's own instructions (sm_89 and later; Triton has
    no float8e4nv before). The interpreter (capability None) uses the integer conversions, which
    are exact where its float8 conversions are not."""
    return capability is not None and capability >= (8, 9)


def check_inputs(
    q: torch.Tensor, kv_cache: LayerKV, out: torch.Tensor | None, lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str, torch.Tensor, torch.Tensor]:
    """Validate q [T, H, D] against the paged cache [2, blocks, KVH, block_size, D] (dense, in q's
    dtype, or int8/fp8 codes and scales). Returns q with unit stride along head_dim (the kernels'
    pointer arithmetic assumes it), the cache split as `split_cache` does, and `out` [T, H, D] and
    `lse` [T, H] fp32, allocated where the caller passed None."""
    kv, scales, kind = split_cache(kv_cache)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv.shape[2]
    check_head_dim(head_dim)
    if q.dtype not in SUPPORTED_DTYPES or (scales is None and kv.dtype != q.dtype):
        raise ValueError(f"unsupported dtypes q={q.dtype}, kv_cache={kv.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv.stride(-1) != 1:
        raise ValueError("kv_cache must have unit stride along head_dim")
    q = q if q.stride(-1) == 1 else q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(q.shape[0], num_heads, dtype=torch.float32, device=q.device)
    return q, kv, scales, kind, out, lse


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel. `block_m` is the query rows per program
    (prefill only); `precision` is tl.dot's input_precision; `num_warps`/`num_stages` are ignored
    by the interpreter."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    precision: str


@functools.cache
def _cuda_properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability (cached; the wrappers ask on every call), or None off CUDA (the
    interpreter, which ignores launch options)."""
    return _cuda_properties(_cuda_index(device))[0] if device.type == "cuda" else None


def multiprocessor_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (cached), None off CUDA."""
    return _cuda_properties(_cuda_index(device))[1] if device.type == "cuda" else None


def prefill_launch_config(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None,
                          int8: bool = False, fp8: bool = False, kivi: bool = False) -> LaunchConfig:
    """FlashAttention-2's tiling for 16-bit inputs: 128 query rows per program (64 before Ampere
    or past head_dim 128), 64-key tiles (32 past head_dim 128), 8 warps for the large tiles. fp32's
    "tf32x3" dots take about three times the registers, so fp32 gets 32 (16) query rows; it is the
    exactness mode, not the fast one. `python -m kvflow.attention.triton.compile_check` compiles
    every (arch, dtype, head_dim) for sm_80/sm_90 and checks from ptxas's report that no 16-bit
    launch spills registers and none overflows shared memory. An int8 or fp8 cache's K/V tiles are
    converted in registers (fp8 by integer arithmetic before sm_89), which before Hopper makes 16-bit
    launches with head_dim >= 128 spill: there the key tiles are halved. An int8 cache's (codes times
    a per-token scale) spills on Hopper too under the Triton of torch 2.11 (3.6: 152 bytes at 128x64
    on an H200; 3.9 does not), so int8 halves them on every GPU. `kivi`: KIVI's tiles (its caller
    also halves the query rows).
    The interpreter (capability None) uses the same tiles as Hopper."""
    if dtype == torch.float32:
        block_m, block_n = (32, 64) if head_dim <= 128 else (16, 32)
        num_warps = 8 if head_dim >= 128 else 4
        num_stages = 2
    else:
        big_tiles = head_dim <= 128 and (capability is None or capability >= (8, 0))
        block_m = 128 if big_tiles else 64
        block_n = 64 if head_dim <= 128 else 32
        num_warps = 8 if block_m * head_dim >= 128 * 64 else 4
        num_stages = 3 if head_dim <= 128 else 2
        converted = int8 or fp8 or kivi
        if converted and head_dim >= 128 and capability is not None and (capability < (9, 0) or int8):
            block_n //= 2
    return LaunchConfig(block_m, block_n, num_warps, num_stages, dot_precision(dtype, capability))


def decode_launch_config(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> LaunchConfig:
    """Decode streams K/V once (memory-bound): 64-key tiles (32 past head_dim 128), 4 warps, and
    enough pipeline stages for the gathered loads to overlap the math."""
    block_n = 64 if head_dim <= 128 else 32
    num_stages = 2 if dtype == torch.float32 or head_dim > 128 else 3
    return LaunchConfig(0, block_n, 4, num_stages, dot_precision(dtype, capability))
