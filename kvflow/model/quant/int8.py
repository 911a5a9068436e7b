"""int8: per-output-channel symmetric weights, run as W8A16 or W8A8.

data: ``qweight`` int8 [N, K] and ``scales`` fp32 [N], w = scales[n] * qweight[n, k], with
scales = max|w_n| / 127 (a row of zeros has scale 0 and codes 0).

W8A16 multiplies the codes by the activations in the activations' dtype and scales each output
column afterwards (one multiply per output, not per weight). W8A8 also rounds each token's
activations to int8 with its own scale (max|x_m| / 127, chosen per call: "dynamic"), multiplies
int8 by int8 into int32 (`torch._int_mm`, which on CPU takes any shape), and scales by both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvflow.model.quant.weights import QuantizedWeight


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    w32 = w.detach().float()
    scales = w32.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w32 / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", (w.shape[0], w.shape[1]), {"qweight": q, "scales": scales})


def dequantize_int8(qw: QuantizedWeight) -> torch.Tensor:
    return qw.data["qweight"].float() * qw.data["scales"].float()[:, None]


def linear_w8a16(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N]: (x · codesᵀ) · scales, in x's dtype (the codes are exact in bf16/fp16)."""
    out = F.linear(x, qw.data["qweight"].to(x.dtype)) * qw.data["scales"].to(x.dtype)
    return out if bias is None else out + bias


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: x [M, K] -> codes int8 [M, K], scales fp32 [M]."""
    x32 = x.float()
    scales = x32.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(x32 / safe[:, None]).clamp_(-127, 127).to(torch.int8), scales


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] times b int8 [N, K] transposed -> int32 [M, N], exactly.

    `torch._int_mm` where it takes the shapes (any on CPU; on CUDA M > 16 and K, N multiples of 8);
    elsewhere fp64, whose 53-bit mantissa holds every sum of K < 2^38 products of int8 exactly."""
    m, k = a.shape
    n = b.shape[0]
    usable = a.device.type == "cpu" or (a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0)
    if usable and hasattr(torch, "_int_mm"):
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().t()).to(torch.int32)


def linear_w8a8(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] through int8 x int8 -> int32, rescaled by the token's and the channel's scales."""
    codes, x_scales = quantize_activations_int8(x)
    acc = int8_matmul(codes, qw.data["qweight"])
    out = (acc.float() * x_scales[:, None] * qw.data["scales"].float()[None, :]).to(x.dtype)
    return out if bias is None else out + bias
