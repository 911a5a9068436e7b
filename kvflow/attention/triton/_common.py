"""Helpers shared by the Triton attention kernels: the K/V tile load through a block table and the
online-softmax step (both `@triton.jit`), and the wrappers' input checks."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.0 / math.log(2.0)  # scores are kept in log2 units so the kernels can use exp2
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def load_kv_tile(kv_base, bt_row, offs_n, n_mask, offs_d, block_size, stride_ckv, stride_cblk, stride_coff):
    """Keys and values at positions `offs_n` of one sequence and kv head, read through its block
    table row `bt_row` (`kv_base` already points at the kv head); masked-off rows read as 0."""
    blk = tl.load(bt_row + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
    kv_ptrs = kv_base + (blk * stride_cblk + (offs_n % block_size) * stride_coff)[:, None] + offs_d[None, :]
    k = tl.load(kv_ptrs, mask=n_mask[:, None], other=0.0)
    v = tl.load(kv_ptrs + stride_ckv, mask=n_mask[:, None], other=0.0)
    return k, v


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One key tile of the FlashAttention-2 recurrence. `s`: scores in log2 units, -inf where not
    visible; returns the new running max, running sum and unnormalised accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


def check_head_dim(head_dim: int) -> None:
    """tl.dot needs power-of-two tiles of at least 16 along the contraction; we do not pad."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"Triton attention needs head_dim a power of two in [16, 256], got {head_dim}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE dots (tf32 would lose ~3 digits); 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_inputs(q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """Validate q [T, H, D] against the paged cache [2, blocks, KVH, block_size, D]; returns q with
    unit stride along head_dim (the kernels' pointer arithmetic assumes it)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[2]
    check_head_dim(head_dim)
    if q.dtype not in SUPPORTED_DTYPES or kv_cache.dtype != q.dtype:
        raise ValueError(f"unsupported dtypes q={q.dtype}, kv_cache={kv_cache.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must have unit stride along head_dim")
    return q if q.stride(-1) == 1 else q.contiguous()
