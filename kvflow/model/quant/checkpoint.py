"""A kvflow-quantised model directory on disk, and quantising a dense checkpoint as it loads.

Layout (what `save_quantized` writes and the loader reads):
- ``config.json``: the model's Hugging Face config plus ``quantization_config`` =
  ``{"quant_method": "kvflow", "format": ..., "bits": ..., "group_size": ...}`` (and
  ``"activation_bits"`` where set, ``"lm_head": true`` where the head is stored quantised, the config
  then untied); `kvflow.config.QuantizationConfig` validates it.
- ``model.safetensors``: dense tensors under their Hugging Face names; a quantised weight ``W`` (e.g.
  ``model.layers.0.self_attn.q_proj.weight``) as one tensor per entry of its data, ``W.<key>``
  (``W.blocks`` for q8_0/q4_0/q4_k, ``W.qweight`` + ``W.scales`` for int8, ``W.planes`` +
  ``W.scales`` + ``W.offsets`` for bipolar), each with N first.
- The safetensors header's metadata ``kvflow.quantized`` (JSON) maps each ``W`` to its format,
  shape, params and keys, so a file says what every quantised tensor is; a layer may hold a different
  format than the config names (a fallback, e.g. q4_k -> q4_0 where 256 does not divide K), or stay
  dense (a layer no format fits, the LM head unless ``lm_head``, the embedding).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvflow.config import QuantizationConfig
from kvflow.model.quant.formats import quantize_fitting
from kvflow.model.quant.weights import QuantizedWeight

METADATA_KEY = "kvflow.quantized"
WEIGHTS_FILE = "model.safetensors"
# Files of a model directory besides its weights and config that a quantised copy keeps.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")
# Layers kept in the model's dtype by default (the embedding is not a linear layer at all).
UNQUANTIZED_LAYERS = ("lm_head",)


def save_quantized(model_dir_out: str | Path, config_dict: dict[str, Any],
                   weights: dict[str, torch.Tensor | QuantizedWeight], copy_from: str | Path | None = None) -> Path:
    """Write a loadable quantised directory: `config_dict` is the model's config.json content with a
    kvflow ``quantization_config``; `weights` maps Hugging Face names to dense tensors or quantised
    weights. `copy_from`: a model directory whose tokenizer and generation config files come along."""
    QuantizationConfig.from_hf(config_dict.get("quantization_config"))  # refuses what kvflow cannot load
    out = Path(model_dir_out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        if name in tensors:
            raise ValueError(f"two weights would be stored as {name!r}")
        tensors[name] = tensor.detach().cpu().contiguous()

    for name, value in weights.items():
        if isinstance(value, QuantizedWeight):
            entries[name] = {"format": value.format, "shape": list(value.shape), "params": value.params,
                             "keys": list(value.data)}
            for key, tensor in value.data.items():
                put(f"{name}.{key}", tensor)
        else:
            put(name, value)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={METADATA_KEY: json.dumps(entries)})
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    if copy_from is not None:
        for name in COPIED_FILES:
            src = Path(copy_from) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out


def read_safetensors(file: str | Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """One safetensors file's weights: dense ones in `dtype`, quantised ones (listed in the header's
    metadata) as `QuantizedWeight`s with their stored dtypes."""
    with safe_open(str(file), framework="pt") as f:
        entries = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        claimed = {f"{name}.{key}" for name, entry in entries.items() for key in entry["keys"]}
        for name, entry in entries.items():
            data = {key: f.get_tensor(f"{name}.{key}") for key in entry["keys"]}
            yield name, QuantizedWeight(entry["format"], tuple(entry["shape"]), data, dict(entry["params"]))
        for name in f.keys():
            if name not in claimed:
                yield name, f.get_tensor(name).to(dtype)


def load_time_quantizer(qcfg: QuantizationConfig) -> Callable[[str, torch.Tensor], QuantizedWeight | None]:
    """`--quantization`: (layer name, dense weight) -> its round-to-nearest quantisation, or None where
    the layer stays dense (the LM head unless `qcfg.lm_head`; a width no format of the fallback chain splits)."""

    def quantize(layer: str, weight: torch.Tensor) -> QuantizedWeight | None:
        if layer.split(".")[-1] in UNQUANTIZED_LAYERS and not qcfg.lm_head:
            return None
        return quantize_fitting(weight, qcfg.format, **qcfg.params)

    return quantize
