"""Building blocks of the decoder: RMSNorm, rotary embedding with scaling, gated MLP."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvflow.config import RopeConfig
from kvflow.model.linear import Linear

if TYPE_CHECKING:
    from kvflow.model.block_zoo import RowRoutes


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Llama-family checkpoints were trained."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # A block zoo (kvflow/model/block_zoo.py): variants whose own norm replaces this one for their rows.
        self.routes: RowRoutes | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.routes.active() if self.routes is not None else None
        if active:
            return self.routes.apply(x, active, self.normalise, lambda block, rows: block.normalise(rows))
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def token_embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """The token embedding, left uninitialised: the loader fills it from the checkpoint (training calls its own
    init). nn.Embedding's normal_ init would, on the loader's meta device, run torch's Python reference of
    normal_, whose first call imports torch._dynamo and Triton: ~1 s and ~140 MiB resident per process."""
    return nn.Embedding(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies for rotary embedding, with linear or llama3 frequency scaling (on the CPU, see
    RotaryEmbedding)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
        original = rope.original_max_position_embeddings or 8192
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        # On the CPU whatever the default device: the loader builds the model on the meta device, where these
        # ops run torch's Python references, whose first call imports torch._dynamo (and Triton): ~1 s and
        # ~140 MiB resident per process, for tables the loader computes again on the real device anyway.
        inv_freq = rope_inv_freq(rope, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_pos, head_dim / 2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # [T, 1, D/2]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GatedMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)
