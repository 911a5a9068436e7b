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
