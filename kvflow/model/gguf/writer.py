"""A llama-architecture GGUF file that llama.cpp loads, from a model's config, weights and tokenizer.

Metadata follows llama.cpp's converter for llama models: shapes, rope (linear scaling as keys,
llama3 scaling as the `rope_freqs.weight` factors), norm epsilon, special tokens, sampling defaults
from generation_config.json. q and k rows are permuted into llama.cpp's rope order. Float weights
keep their dtype (F32, F16, BF16; one-dimensional tensors always F32, as llama.cpp's converter
writes them); `QuantizedWeight`s in a GGUF block format are written as their blocks, unchanged.
A tied LM head is left out: llama.cpp then reads the embedding.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvflow.config import ModelConfig
from kvflow.gguf_config import ROPE_FREQS_TENSOR, is_gguf_path
from kvflow.model.gguf.names import gguf_name, rope_heads, rope_row_order
from kvflow.model.gguf.tokenizer import tokenizer_from_gguf, tokenizer_metadata
from kvflow.model.quant.weights import QuantizedWeight

# kvflow format -> (ggml type name, llama.cpp file type name): what write_gguf stores as blocks.
GGUF_BLOCK_TYPES = {"q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_k": ("Q4_K", "MOSTLY_Q4_K_M")}
_FLOAT_TYPES = {torch.float32: ("F32", "ALL_F32"), torch.float16: ("F16", "MOSTLY_F16"),
                torch.bfloat16: ("BF16", "MOSTLY_BF16")}
# generation_config.json -> llama.cpp's general.sampling.* writer methods.
_SAMPLING = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "penalty_repeat"}
_LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def write_gguf(path: str | os.PathLike, model: str | os.PathLike | ModelConfig,
               weights: Mapping[str, torch.Tensor | QuantizedWeight], tokenizer: str | os.PathLike | Any | None = None,
               name: str | None = None) -> Path:
    """Write `weights` (Hugging Face names) of `model` (a model directory or its ModelConfig) to `path`.

    `tokenizer` is a tokenizer directory, a GGUF file or a transformers tokenizer; None takes the
    model's own. Returns the path written.
    """
    import gguf

    cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_pretrained(model)
    _check_llama(cfg)
    model_dir = Path(cfg.path) if Path(cfg.path).is_dir() else None
    generation = _generation_config(model_dir)
    source = tokenizer if tokenizer is not None else cfg.tokenizer_path
    if isinstance(source, (str, os.PathLike)) and is_gguf_path(source):
        source = tokenizer_from_gguf(source)
    if source is None or (isinstance(source, (str, os.PathLike)) and not Path(source).is_dir()):
        raise ValueError(f"no tokenizer to write for {cfg.path}: pass tokenizer= (llama.cpp needs one)")
    eos = set(cfg.eos_token_ids) | set(_as_list(generation.get("eos_token_id")))
    tok_meta = tokenizer_metadata(source, cfg.vocab_size, tuple(sorted(eos)))

    tensors = _gguf_tensors(cfg, weights)
    out = Path(path)
    writer = gguf.GGUFWriter(out, arch="llama")
    writer.add_name(name or (model_dir.name if model_dir else out.stem))
    _add_shape(writer, cfg)
    counts = Counter(kind for kind, _ in tensors.values() if kind not in ("F32",))
    main = counts.most_common(1)[0][0] if counts else "F32"
    file_type = next((ft for t, ft in [*GGUF_BLOCK_TYPES.values(), *_FLOAT_TYPES.values()] if t == main), "ALL_F32")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    if any(kind in {t for t, _ in GGUF_BLOCK_TYPES.values()} for kind, _ in tensors.values()):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_meta.add_to(writer)
    for key, method in _SAMPLING.items():
        if generation.get(key) is not None and generation.get("do_sample", True):
            getattr(writer, f"add_sampling_{method}")(generation[key])
    for tensor_name, (kind, array) in tensors.items():
        writer.add_tensor(tensor_name, array, raw_dtype=gguf.GGMLQuantizationType[kind])
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _check_llama(cfg: ModelConfig) -> None:
    """llama.cpp's llama graph: no q/k norms, no sliding windows, biases only as Llama states them."""
    if cfg.architecture not in _LLAMA_ARCHITECTURES or cfg.qk_norm or any(w is not None for w in cfg.sliding_windows):
        raise ValueError(f"write_gguf writes llama-architecture files (Llama, Mistral without sliding windows); "
                         f"{cfg.path} is {cfg.architecture}")


def _as_list(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _generation_config(model_dir: Path | None) -> dict[str, Any]:
    file = model_dir / "generation_config.json" if model_dir else None
    return json.loads(file.read_text()) if file and file.is_file() else {}


def _add_shape(writer: Any, cfg: ModelConfig) -> None:
    import gguf

    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_model_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope.factor)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's per-frequency divisors for llama3 rope scaling (what its converter writes)."""
    rope = cfg.rope
    original = rope.original_max_position_embeddings or 8192
    low_wavelen, high_wavelen = original / rope.low_freq_factor, original / rope.high_freq_factor
    factors = []
    for i in range(cfg.head_dim // 2):
        wavelen = 2 * math.pi * rope.theta ** (2 * i / cfg.head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope.factor)
        else:
            smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
            factors.append(1 / ((1 - smooth) / rope.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _gguf_tensors(cfg: ModelConfig, weights: Mapping[str, torch.Tensor | QuantizedWeight]
                  ) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (ggml type name, array as the writer takes it), checked against the config."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for hf, value in weights.items():
        if "rotary_emb" in hf or (hf == "lm_head.weight" and cfg.tie_word_embeddings
                                  and not isinstance(value, QuantizedWeight)):
            continue  # a tied head is the embedding; a quantised one (`--lm-head`) is written as output.weight
        name = gguf_name(hf)
        if name is None:
            raise ValueError(f"tensor {hf!r} has no place in a llama GGUF file")
        heads = rope_heads(hf, cfg.num_heads, cfg.num_kv_heads)
        out[name] = _convert(hf, value, heads)
    if cfg.rope.rope_type == "llama3":
        out[ROPE_FREQS_TENSOR] = ("F32", llama3_rope_factors(cfg))
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(cfg.num_layers)
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down")}
    if not cfg.tie_word_embeddings:
        expected.add("output.weight")
    missing = sorted(expected - set(out))
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensors of {cfg.path}: {', '.join(missing[:6])}")
    return out


def _convert(hf: str, value: torch.Tensor | QuantizedWeight, heads: int | None) -> tuple[str, np.ndarray]:
    if isinstance(value, QuantizedWeight):
        if value.format not in GGUF_BLOCK_TYPES:
            raise ValueError(f"{hf}: format {value.format} has no GGUF block type; GGUF stores "
                             f"{', '.join(GGUF_BLOCK_TYPES)}")
        import gguf

        kind = GGUF_BLOCK_TYPES[value.format][0]
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        blocks = value.data["blocks"]
        expected = (value.out_features, value.in_features // block * nbytes)
        if value.in_features % block or tuple(blocks.shape) != expected or blocks.dtype != torch.uint8:
            raise ValueError(f"{hf}: {value.format} of shape {value.shape} needs in_features divisible by {block} and "
                             f"uint8 blocks of shape {expected}; got {tuple(blocks.shape)} {blocks.dtype}")
        if heads is not None:
            blocks = blocks[rope_row_order(value.out_features, heads, to_gguf=True)]
        return kind, blocks.contiguous().numpy()
    tensor = value.detach().cpu()
    if heads is not None:
        tensor = tensor[rope_row_order(tensor.shape[0], heads, to_gguf=True)]
    if tensor.dim() == 1 or tensor.dtype not in _FLOAT_TYPES:
        tensor = tensor.float()
    kind = _FLOAT_TYPES[tensor.dtype][0]
    tensor = tensor.contiguous()
    return kind, tensor.view(torch.uint8).numpy() if tensor.dtype is torch.bfloat16 else tensor.numpy()
