"""oneDNN-prepacked bf16 linear layers for CPU.

Profiling the `135m` single stream showed matrix-vector products taking about 64% of a decode
step. Plain `F.linear` on bf16 weights streams them from memory at about 10 GB/s, a third of
this machine's bandwidth. Once oneDNN has reordered the weights into its blocked layout, the
same products run 1.5–3.6× faster, at every batch size we measured (1 to 512 rows), with
bit-identical bf16 results, so the switch changes speed and nothing else. The reorder happens
once, after loading. PyTorch's inductor uses the same two ops when it freezes a model for CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the packed path is bit-identical and faster: bf16 weights on a CPU with oneDNN."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def block_rows(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [N, K] as [N/4, K/32, 4, 32]: the layout of the C++ forward's decode GEMV, where a
    block of four output rows is one sequential stream. None where the shape does not divide."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or n % 4 or k % 32:
        return None
    return weight.detach().reshape(n // 4, 4, k // 32, 32).permute(0, 2, 1, 3).contiguous()


class PackedLinear(nn.Module):
    """`y = x W^T + b` with W held in oneDNN's blocked layout (not a Parameter: inference only).

    `decode_copy`: also keep W in the decode GEMV's row-blocked layout (`block_rows`), which the
    C++ forward uses for steps of a few tokens. oneDNN's layout is opaque, so this is a second copy
    of the weight: memory traded for single-stream speed."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, decode_copy: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # The batch-size hint only picks the blocking; 1 (decode) is the case that matters most.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.register_buffer("blocked_weight", block_rows(weight) if decode_copy else None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, decode_copy: bool = False) -> PackedLinear:
        return cls(linear.weight, linear.bias, decode_copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module, decode_copies: bool = False) -> int:
    """Replace every `nn.Linear` in `model` by its packed form, in place; returns how many.

    The original weights are released (the packed copy replaces them), so memory does not grow,
    unless `decode_copies` keeps each in the decode GEMV's layout too (see PackedLinear).
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear.from_linear(child, decode_copies))
                count += 1
    return count
