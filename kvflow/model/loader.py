"""Hugging Face model directory (or GGUF file) -> our model, tokenizer and generation defaults.

Weights are read with safetensors only (memory-mapped, one tensor at a time). A directory that
holds only pickle weights (`*.bin`, `*.pt`, `*.pth`) is refused: unpickling runs arbitrary code.
A `.gguf` path is read by `kvflow/model/gguf/` (weights, tokenizer) and its metadata.

Quantised weights: a directory written by kvflow (`quantization_config.quant_method` "kvflow", layout
in `kvflow/model/quant/checkpoint.py`) yields its quantised linear weights as `QuantizedWeight`s, as
a GGUF file does for its block formats; `--quantization` quantises a dense checkpoint's linear
weights one by one as they load. Linear weights are left unallocated until a dense tensor arrives for
them, so a quantised layer never holds (nor briefly allocates) a dense copy.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kvflow.config import ModelConfig, QuantizationConfig, read_json
from kvflow.gguf_config import generation_config_from_gguf, is_gguf_path
from kvflow.model.layers import RotaryEmbedding
from kvflow.model.linear import DenseLinear, linear_layers
from kvflow.model.quant.checkpoint import load_time_quantizer, read_safetensors
from kvflow.model.quant.linear_methods import QuantizedLinear
from kvflow.model.quant.weights import QuantizedWeight
from kvflow.model.registry import model_class

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors shards, from the index when there is one."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index)["weight_map"]
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not in {root}: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{root} holds only pickle weights ({', '.join(pickles)}); kvflow reads safetensors only, "
            "because unpickling a file can execute arbitrary code. Convert the checkpoint with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise ValueError(f"{root} has no *.safetensors weights")


def iter_weights(path: str | Path, dtype: torch.dtype) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor in `dtype`) pairs; quantised weights (a GGUF file's block formats, a kvflow-quantised
    directory's) come as QuantizedWeight."""
    if is_gguf_path(path):
        from kvflow.model.gguf import iter_gguf_weights

        for name, weight in iter_gguf_weights(path):
            yield name, weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
        return
    for file in safetensors_files(path):
        yield from read_safetensors(file, dtype)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Build the model without initialising weights (meta device), then fill it from the checkpoint."""
    device = torch.device(device)
    cls = model_class(cfg)
    with torch.device("meta"):
        model = cls(cfg).to(cfg.dtype)
    # Linear weights stay on meta (allocated by load_weights when a dense tensor arrives for one).
    deferred = [(layer, layer.weight) for layer in linear_layers(model)]
    for layer, _ in deferred:
        del layer.weight
    model = model.to_empty(device=device)
    for layer, weight in deferred:
        layer.weight = weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # non-persistent tables were lost on meta
            fresh = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, cfg.rope).to(device)
            module.cos, module.sin = fresh.cos, fresh.sin
    quantization = cfg.quantization
    quantize = load_time_quantizer(quantization) if quantization is not None and quantization.on_load else None
    with torch.no_grad():
        model.load_weights(iter_weights(cfg.path, cfg.dtype), quantize=quantize)
    model.finish_loading()
    if quantize is not None and quantization.lm_head:
        quantize_tied_head(model, quantize, quantization)
    return model.eval().requires_grad_(False)


def release_freed_heap() -> None:
    """Give the heap memory that loading freed back to the OS. glibc keeps freed blocks mapped, so the dense
    copies a model quantises away at load, and the conversions and repacking after it, stayed in the process's
    resident set (`135m` at load: int8 1,056 MiB resident, bipolar3 1,194; 960 and 917 after this). A no-op
    where libc has no `malloc_trim`. (No gc.collect() here: it took ~140 ms per engine with torch loaded,
    and what loading frees goes by reference counting.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantize_tied_head(model: nn.Module, quantize: Callable[[str, torch.Tensor], QuantizedWeight | None],
                       quantization: QuantizationConfig) -> None:
    """`--quantization-lm-head` on a tied head: `finish_loading` made it a view of the embedding, which the
    lookup keeps dense; the head alone takes the quantised copy. (An untied head was quantised as it loaded.)"""
    head = getattr(model, "lm_head", None)
    if head is None or not isinstance(head.method, DenseLinear):
        return
    weight = quantize("lm_head", head.weight.detach())
    if weight is None:
        raise ValueError(f"the LM head ({head.out_features}x{head.in_features}) has no {quantization.format} "
                         "layout: --quantization-lm-head cannot quantise it")
    head.use(QuantizedLinear(weight, quantization.activation_bits_for(weight.format)))


def load_tokenizer(path: str | Path) -> Any | None:
    """The directory's tokenizer via transformers (a GGUF file's: from its metadata), or None when it
    ships none (token-id prompts only)."""
    if is_gguf_path(path):
        from kvflow.model.gguf import tokenizer_from_gguf

        return tokenizer_from_gguf(path)
    root = Path(path)
    if not any((root / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


def load_generation_config(path: str | Path) -> dict[str, Any]:
    if is_gguf_path(path):
        return generation_config_from_gguf(path)
    file = Path(path) / "generation_config.json"
    return read_json(file) if file.is_file() else {}


def eos_token_ids(cfg: ModelConfig, generation_config: dict[str, Any], tokenizer: Any | None) -> tuple[int, ...]:
    """Every id that ends generation: config, generation_config and the tokenizer's EOS."""
    ids = set(cfg.eos_token_ids)
    gen_eos = generation_config.get("eos_token_id")
    if isinstance(gen_eos, list):
        ids.update(int(i) for i in gen_eos)
    elif gen_eos is not None:
        ids.add(int(gen_eos))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
