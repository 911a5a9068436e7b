"""Write a step's new keys/values into the paged KV cache (Triton).

The cache layout is the torch-native one, `[2, num_blocks, num_kv_heads, block_size, head_dim]`
(index 0 = keys, 1 = values), so both backends can share caches and be compared slot for slot.
One program per token writes all of its KV heads: one scalar slot load, then two 2-D tile stores.
An int8 cache `(codes, scales)` gets each row quantised as kv_quant.quantize_int8 does, and an fp8
cache `(codes, head_scales)` as kv_quant.quantize_fp8 does, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.attention.kv_quant import calibrate_fp8
from kvflow.attention.kv_spec import LayerKV
from kvflow.attention.triton._common import (
    FP8,
    FP8_MAX,
    INT8,
    cache_pointers,
    device_capability,
    fp8_native,
    fp32_to_fp8e4m3,
    split_cache,
)

# 1.5 * 2**23: adding it to an fp32 |y| <= 2**22 leaves no fraction bits, so the addition rounds y
# to an integer, half to even (as torch.round), in the interpreter and compiled alike.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_int8(x):
    """Rows x [H, D] (masked-off lanes 0) -> (codes int8 [H, D], scales fp32 [H]), exactly as
    kv_quant.quantize_int8 computes them: `127 / amax` and `amax / 127` correctly rounded
    (div_rn); clamping to +-127 before rounding gives the same codes and puts a min/max between
    the multiply and the rounding add, which therefore cannot be fused into an FMA (one rounding,
    other codes)."""
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    nonzero = amax > 0
    inv = tl.where(nonzero, tl.math.div_rn(127.0, tl.where(nonzero, amax, 1.0)), 0.0)
    y = tl.minimum(tl.maximum(x * inv[:, None], -127.0), 127.0)
    codes = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    return codes.to(tl.int8), tl.math.div_rn(amax, 127.0)


@triton.jit
def _quantize_fp8(x, scale, FP8_NATIVE: tl.constexpr):
    """Rows x [H, D] with their heads' scales [H] -> float8_e4m3fn codes as bytes (uint8 [H, D]),
    exactly as kv_quant.quantize_fp8 computes them: x / scale correctly rounded (div_rn), clamped
    to +-448, rounded to nearest even: by the GPU's conversion (FP8_NATIVE, which saturates) or by
    integer arithmetic (_common.fp32_to_fp8e4m3)."""
    y = tl.math.div_rn(x.to(tl.float32), scale[:, None])
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if FP8_NATIVE:
        codes = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    else:
        codes = fp32_to_fp8e4m3(y)
    return codes


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, slot_ptr, cache_ptr, scale_ptr,
    stride_ckv, stride_cblk, stride_ch, stride_coff,
    stride_skv, stride_sblk, stride_sh, stride_soff,
    stride_kt, stride_kh, stride_vt, stride_vh,
    block_size, num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr, FP8: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative slots are padding tokens: nothing to store
        blk = slot // block_size
        off = slot % block_size
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        h_mask = h < num_kv_heads
        mask = h_mask[:, None] & (d[None, :] < head_dim)
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
        dst = cache_ptr + blk * stride_cblk + off * stride_coff + h[:, None] * stride_ch + d[None, :]
        if INT8:
            k, k_scale = _quantize_int8(k)
            v, v_scale = _quantize_int8(v)
            scale_dst = scale_ptr + blk * stride_sblk + off * stride_soff + h * stride_sh
            tl.store(scale_dst, k_scale, mask=h_mask)
            tl.store(scale_dst + stride_skv, v_scale, mask=h_mask)
        if FP8:  # the kv heads' scales (set before the launch)
            k_scale = tl.load(scale_ptr + h * stride_sh, mask=h_mask, other=1.0)
            v_scale = tl.load(scale_ptr + stride_skv + h * stride_sh, mask=h_mask, other=1.0)
            k = _quantize_fp8(k, k_scale, FP8_NATIVE)
            v = _quantize_fp8(v, v_scale, FP8_NATIVE)
        tl.store(dst, k, mask=mask)
        tl.store(dst + stride_ckv, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: LayerKV, slot_mapping: torch.Tensor, *,
             calibrate: bool = True) -> None:
    """Store `k`, `v` ([T, num_kv_heads, head_dim]) at `slot_mapping` ([T]); slots < 0 are skipped.
    `kv_cache` is dense (k's dtype), or an int8 (codes, scales) or fp8 (codes, head_scales) pair,
    which gets them quantised. fp8, as kv_quant.store_fp8: the scales not yet set are first
    calibrated from this k, v (`calibrate_fp8`, in PyTorch; it reads the scales back, a device sync,
    which `calibrate=False` skips where the caller knows them set)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    kv, scales, kind = split_cache(kv_cache)
    if num_tokens == 0:
        return
    if v.shape != k.shape or kv.shape[2] != num_kv_heads or kv.shape[4] != head_dim:
        raise ValueError(f"shape mismatch: k {tuple(k.shape)}, v {tuple(v.shape)}, cache {tuple(kv.shape)}")
    # The kernel assumes unit stride along head_dim (the natural layout of every view we get).
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if kv.stride(-1) != 1:
        raise ValueError("kv_cache must have unit stride along head_dim")
    if kind == FP8 and calibrate:
        calibrate_fp8(scales, k, v)
    _store_kv_kernel[(num_tokens,)](
        k, v, slot_mapping, *cache_pointers(kv, scales, kind),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv.shape[3], num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        INT8=kind == INT8, FP8=kind == FP8, FP8_NATIVE=kind == FP8 and fp8_native(device_capability(k.device)),
    )
