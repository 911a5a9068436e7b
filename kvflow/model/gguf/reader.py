"""GGUF file -> (Hugging Face name, tensor or QuantizedWeight) pairs, for the loader.

Float tensors (F32, F16, BF16) come out as torch tensors over the file's memory map (no copy until
the loader copies them in). The block formats kvflow runs (Q8_0, Q4_0, Q4_K) come out as
`QuantizedWeight`s holding llama.cpp's bytes unchanged. Every other ggml type is dequantised to
float32 with gguf's reference code, and one log line names those tensors. q and k rows are put
back into Hugging Face's order (see `names.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvflow.gguf_config import ROPE_FREQS_TENSOR, gguf_architecture, read_gguf
from kvflow.model.gguf.names import hf_name, rope_heads, rope_row_order
from kvflow.model.quant.weights import QuantizedWeight

logger = logging.getLogger(__name__)


def block_formats() -> dict[Any, str]:
    """ggml types kept as blocks -> kvflow's format names."""
    from gguf import GGMLQuantizationType as T

    return {T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q4_K: "q4_k"}


def float_types() -> dict[Any, torch.dtype]:
    from gguf import GGMLQuantizationType as T

    return {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def iter_gguf_weights(path: str | os.PathLike, dequantize: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Every model tensor of a llama-architecture GGUF file under its Hugging Face name.

    `dequantize=True` turns the block formats into float32 tensors as well (gguf's reference
    dequantisation): the dense model a quantised file stands for, which tests compare against.
    """
    parsed = read_gguf(path)
    meta = parsed.metadata
    arch = gguf_architecture(meta, path)
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv") or heads)
    blocks, floats = block_formats(), float_types()
    dequantised: list[str] = []
    for t, data in parsed.map_tensors():
        if t.name == ROPE_FREQS_TENSOR:
            continue  # read into the config's rope scaling (kvflow/gguf_config.py)
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: tensor {t.name} has no place in a llama model")
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1
        cols = int(t.shape[0])
        if len(t.shape) > 2 or (len(t.shape) == 2 and data.shape[0] != rows):
            raise ValueError(f"{path}: tensor {t.name} has unsupported shape {list(t.shape)}")
        value: torch.Tensor | QuantizedWeight
        if t.tensor_type in floats:
            value = _float_tensor(data, floats[t.tensor_type])
        elif t.tensor_type in blocks and not dequantize and len(t.shape) == 2:
            value = QuantizedWeight(blocks[t.tensor_type], (rows, cols), {"blocks": torch.from_numpy(data)})
        else:
            from gguf.quants import dequantize as gguf_dequantize

            if t.tensor_type not in blocks:
                dequantised.append(f"{t.name} ({t.tensor_type.name})")
            value = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(data, t.tensor_type), dtype=np.float32))
        group = rope_heads(t.name, heads, kv_heads)
        if group is not None:
            value = _permute_rows(value, rope_row_order(rows, group, to_gguf=False))
        yield name, value
    if dequantised:
        logger.info("%s: dequantised to float32 (kvflow runs only F32/F16/BF16 and Q8_0/Q4_0/Q4_K as stored): %s",
                    path, ", ".join(dequantised))


def _float_tensor(data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch view of a float tensor's bytes (the reader hands BF16 over as raw bytes)."""
    tensor = torch.from_numpy(data)
    return tensor.view(torch.bfloat16) if dtype is torch.bfloat16 else tensor


def _permute_rows(value: torch.Tensor | QuantizedWeight, order: torch.Tensor) -> torch.Tensor | QuantizedWeight:
    if isinstance(value, QuantizedWeight):
        return QuantizedWeight(value.format, value.shape, {k: v[order] for k, v in value.data.items()},
                               dict(value.params))
    return value[order]
