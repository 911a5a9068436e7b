"""Rows that test an int8 KV quantiser's rounding against kv_quant.quantize_int8 (shared by the
C++ and Triton store tests)."""

from __future__ import annotations

import torch

from kvflow.attention.kv_quant import quantize_int8


def _reciprocal_codes(x: torch.Tensor) -> torch.Tensor:
    """The codes under 127 / amax computed as reciprocal * 127 (rounded twice; what `127 / amax`
    with a Python number gives in PyTorch), which quantize_int8 must not do."""
    amax = x.float().abs().amax(-1, keepdim=True)
    return torch.round(x.float() * (amax.reciprocal() * 127)).clamp(-127, 127).to(torch.int8)


def int8_test_rows(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [R, head_dim] of `dtype` that test the rounding: ties at .5 both ways (amax 127 and 127/8
    make 127/amax exactly 1 and 8), an all-zero row, random rows of magnitudes 1e-4..1e4, and rows
    whose codes depend on computing 127/amax as one correctly rounded division: values a few ulps
    from a tie, for amaxes where reciprocal-then-times-127 gives other codes."""
    ties = torch.arange(head_dim, dtype=torch.float32) - head_dim // 2 + 0.5  # ..., -0.5, 0.5, 1.5, ...
    ties[0] = 127.0
    gen = torch.Generator().manual_seed(0)
    amax = (1 + torch.rand(2048, generator=gen)).to(dtype).float()
    base = (torch.arange(126)[None, :] + 0.5) / (torch.tensor(127.0) / amax)[:, None]  # x * inv = k + 0.5
    eps = torch.finfo(dtype).eps
    near = [(base * (1 + j * eps / 2)).to(dtype).float() for j in (-2, -1, 0, 1, 2)]
    rows = torch.cat([amax[:, None], *near], 1)  # amax first, then values below it
    telling = quantize_int8(rows)[0] != _reciprocal_codes(rows)
    order = telling.float().argsort(dim=1, descending=True, stable=True)[:, :head_dim - 1]
    picked = torch.cat([amax[:, None], rows.gather(1, order)], 1)[telling.any(1)][:8]
    picked[1::2] *= -1
    assert len(picked) and (quantize_int8(picked)[0] != _reciprocal_codes(picked)).any(1).all()
    random = torch.randn(8, head_dim, generator=gen) * torch.logspace(-4, 4, 8)[:, None]
    return torch.cat([ties[None], ties[None] / 8, -ties[None], torch.zeros(1, head_dim), picked, random]).to(dtype)
