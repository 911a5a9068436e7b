"""Write a step's new keys/values into the paged KV cache (Triton).

The cache layout is the torch-native one, `[2, num_blocks, num_kv_heads, block_size, head_dim]`
(index 0 = keys, 1 = values), so both backends can share caches and be compared slot for slot.
One program per token writes all of its KV heads: one scalar slot load, then two 2-D tile stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cblk, stride_ch, stride_coff,
    block_size, num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative slots are padding tokens: nothing to store
        blk = slot // block_size
        off = slot % block_size
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < num_kv_heads) & (d[None, :] < head_dim)
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        dst = cache_ptr + blk * stride_cblk + off * stride_coff + h[:, None] * stride_ch + d[None, :]
        tl.store(dst, k, mask=mask)
        tl.store(dst + stride_ckv, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store `k`, `v` ([T, num_kv_heads, head_dim]) at `slot_mapping` ([T]); slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if v.shape != k.shape or kv_cache.shape[2] != num_kv_heads or kv_cache.shape[4] != head_dim:
        raise ValueError(f"shape mismatch: k {tuple(k.shape)}, v {tuple(v.shape)}, cache {tuple(kv_cache.shape)}")
    # The kernel assumes unit stride along head_dim (the natural layout of every view we get).
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must have unit stride along head_dim")
    _store_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[3], num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
