"""A long-conv model as an ordinary model directory: config.json (architectures ["LongConvForCausalLM"])
and model.safetensors, plus the tokenizer if one is given, so `LLM(model=dir)` and the loader read it
like any other (no Hugging Face class exists for it; kvflow's `LongConvForCausalLM` is the reference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvflow.config import LONGCONV_ARCHITECTURE, ModelConfig
from kvflow.model.longconv.model import LongConvForCausalLM


def longconv_hf_config(vocab_size: int, hidden_size: int, num_layers: int, intermediate_size: int,
                       max_position_embeddings: int, kernel_length: int | None = None, squash_lambda: float = 0.0,
                       smooth_width: int = 1, tie_word_embeddings: bool = True, rms_norm_eps: float = 1e-5,
                       dtype: str = "float32", **tokens: Any) -> dict[str, Any]:
    """config.json's content; `tokens`: bos_token_id, eos_token_id, pad_token_id. No `model_type`: transformers
    knows none for it, and one it does not know makes AutoTokenizer warn on every load."""
    return {
        "architectures": [LONGCONV_ARCHITECTURE], "vocab_size": vocab_size,
        "hidden_size": hidden_size, "num_hidden_layers": num_layers, "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "kernel_length": kernel_length or max_position_embeddings, "squash_lambda": squash_lambda,
        "smooth_width": smooth_width, "tie_word_embeddings": tie_word_embeddings, "rms_norm_eps": rms_norm_eps,
        "dtype": dtype, **tokens,
    }


def build_longconv(hf: dict[str, Any], path: str = "") -> LongConvForCausalLM:
    """A model (uninitialised weights) from config.json's content."""
    return LongConvForCausalLM(ModelConfig.from_hf_dict(hf, path))


def save_longconv(model: LongConvForCausalLM, hf: dict[str, Any], out_dir: str | Path, tokenizer: Any = None,
                  generation_config: dict[str, Any] | None = None) -> Path:
    """Write the directory; the tied head is not stored (it is the embedding)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to(torch.float32 if hf.get("dtype", "float32") == "float32" else t.dtype).contiguous()
             for name, t in model.state_dict().items()
             if not (name.startswith("lm_head.") and hf.get("tie_word_embeddings", True))}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
