"""Small helpers shared by the Triton attention kernels' wrappers."""

from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)  # scores are kept in log2 units so the kernels can use exp2
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
