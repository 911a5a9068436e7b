"""`QuantizedWeight`: a linear layer's weight in a quantised format, as loaders and writers pass it.

The one shape every path agrees on: a GGUF reader, a quantised safetensors directory and `kvflow
quantize` all produce one of these per linear weight, and a quantised linear method consumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class QuantizedWeight:
    """A [out_features, in_features] weight held in `format` (a name of `formats.FORMATS`).

    `data` holds the format's tensors. GGUF block formats (q8_0, q4_0, q4_k) keep llama.cpp's bytes
    unchanged: ``data["blocks"]`` is uint8 [out_features, in_features // block_size * block_bytes], each
    row the row's blocks in order, exactly as a GGUF file stores them. Other formats name their own
    tensors (codes, scales, offsets). `params` carries what the format needs besides (bits, group size).
    """

    format: str
    shape: tuple[int, int]
    data: dict[str, torch.Tensor]
    params: dict[str, int] = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())
