"""The one table of weight formats (as ggml's type traits): what a block is, what it costs, and how
to get into and out of it. Loaders, `kvflow quantize`, the linear methods and the GGUF writer all
consult `FORMATS`; the names are `kvflow.config.QUANT_FORMATS` (config validates against them
without importing the model layer).

| name    | block along K        | bytes/block   | bits/weight          | w =                          |
|---------|----------------------|---------------|----------------------|------------------------------|
| q8_0    | 32                   | 34            | 8.5                  | d · q                        |
| q4_0    | 32                   | 18            | 4.5                  | d · (q − 8)                  |
| q4_k    | 256 (8 × 32)         | 144           | 4.5                  | d·sc_j · q − dmin·m_j        |
| int8    | the row              | K + 4         | 8 + 32/K             | s_n · q                      |
| bipolar | G (default 64)       | G·n/8 + 4     | n + 32/G (fp16 s, o) | s_g · Σ(2b_i − 1)2^i + o_g   |

Every format quantises rows independently (blocks and groups never cross a row), so a weight's row
shards quantise to the row shards of its quantisation: fused q/k/v and gate/up concatenate along N.
A weight whose width a format cannot split takes the format's `fallback` (q4_k -> q4_0, the same
4.5 bits; llama.cpp itself falls back to q5_0, which kvflow does not run), or stays dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvflow.config import QUANT_FORMATS
from kvflow.model.quant import bipolar, gguf_blocks, int8
from kvflow.model.quant.weights import QuantizedWeight


@dataclass(frozen=True)
class QuantFormat:
    name: str
    family: str  # "gguf" | "int8" | "bipolar": the linear method that runs it
    block_size: int | None  # weights per block along K (bipolar: the default group); None: the whole row
    block_bytes: int | None  # bytes per block where fixed (GGUF)
    bits: int  # code bits (bipolar: the default)
    _quantize: Callable[..., QuantizedWeight] = field(repr=False)
    _dequantize: Callable[[QuantizedWeight], torch.Tensor] = field(repr=False)
    params: tuple[str, ...] = ()  # keyword parameters `quantize` takes
    fallback: str | None = None

    def group(self, params: dict[str, Any]) -> int | None:
        return params.get("group_size", self.block_size)

    def fits(self, in_features: int, params: dict[str, Any] | None = None) -> bool:
        """Whether a row of `in_features` weights splits into this format's blocks or groups."""
        group = self.group(params or {})
        return group is None or in_features % group == 0

    def bits_per_weight(self, in_features: int, params: dict[str, Any] | None = None) -> float:
        """Storage per weight, codes and scales together (bipolar: fp16 scales and offsets)."""
        params = params or {}
        if self.block_bytes is not None:
            return self.block_bytes * 8 / self.block_size
        if self.family == "int8":
            return 8 + 32 / in_features
        return params.get("bits", self.bits) + 32 / self.group(params)

    def quantize(self, w: torch.Tensor, **params: Any) -> QuantizedWeight:
        """Round to nearest: a float [N, K] weight -> this format."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"format {self.name} takes no parameter {', '.join(sorted(unknown))} "
                             f"(it takes: {', '.join(self.params) or 'none'})")
        if w.dim() != 2:
            raise ValueError(f"quantise a [out_features, in_features] weight, got shape {tuple(w.shape)}")
        if not self.fits(w.shape[1], params):
            raise ValueError(f"format {self.name} needs in_features divisible by {self.group(params)}, "
                             f"got {w.shape[1]}")
        return self._quantize(w, **params)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """float32 [N, K], on the device the data is on."""
        return self._dequantize(qw)


def _gguf(name: str, block: int, nbytes: int, q, dq, fallback: str | None = None) -> QuantFormat:
    return QuantFormat(
        name, "gguf", block, nbytes, 8 if name == "q8_0" else 4,
        lambda w: QuantizedWeight(name, (w.shape[0], w.shape[1]), {"blocks": q(w)}),
        lambda qw: dq(qw.data["blocks"], qw.shape), fallback=fallback,
    )


FORMATS: dict[str, QuantFormat] = {
    "q8_0": _gguf("q8_0", gguf_blocks.QK8_0, gguf_blocks.Q8_0_BYTES, gguf_blocks.quantize_q8_0,
                  gguf_blocks.dequantize_q8_0),
    "q4_0": _gguf("q4_0", gguf_blocks.QK4_0, gguf_blocks.Q4_0_BYTES, gguf_blocks.quantize_q4_0,
                  gguf_blocks.dequantize_q4_0),
    "q4_k": _gguf("q4_k", gguf_blocks.QK_K, gguf_blocks.Q4_K_BYTES, gguf_blocks.quantize_q4_k,
                  gguf_blocks.dequantize_q4_k, fallback="q4_0"),
    "int8": QuantFormat("int8", "int8", None, None, 8, int8.quantize_int8, int8.dequantize_int8),
    "bipolar": QuantFormat("bipolar", "bipolar", bipolar.DEFAULT_GROUP, None, 4, bipolar.quantize_bipolar,
                           bipolar.dequantize_bipolar, params=("bits", "group_size")),
}
assert tuple(FORMATS) == QUANT_FORMATS, "kvflow.config.QUANT_FORMATS names the formats of this table"


def get_format(name: str) -> QuantFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]


def quantize(w: torch.Tensor, format: str, **params: Any) -> QuantizedWeight:
    return get_format(format).quantize(w, **params)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    return get_format(qw.format).dequantize(qw)


def quantize_fitting(w: torch.Tensor, format: str, **params: Any) -> QuantizedWeight | None:
    """`format`, else its fallback chain, for a weight of this width; None where none fits (the
    weight stays dense). Parameters go to the formats that take them."""
    name: str | None = format
    while name is not None:
        fmt = get_format(name)
        own = {k: v for k, v in params.items() if k in fmt.params}
        if fmt.fits(w.shape[1], own):
            return fmt.quantize(w, **own)
        name = fmt.fallback
    return None


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row shards of one weight (in order) -> the whole weight. Every data tensor has N first."""
    first = parts[0]
    for p in parts[1:]:
        if (p.format, p.in_features, p.params) != (first.format, first.in_features, first.params):
            raise ValueError(f"cannot fuse {p.format} {p.shape} {p.params} with {first.format} {first.shape} "
                             f"{first.params}: shards of one layer need one format")
    if len(parts) == 1:
        return first
    data = {key: torch.cat([p.data[key] for p in parts]) for key in first.data}
    return QuantizedWeight(first.format, (sum(p.out_features for p in parts), first.in_features), data,
                           dict(first.params))
