"""Tiny random long-conv model directories and the reference greedy continuation, for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvflow.model.longconv.checkpoint import build_longconv, longconv_hf_config, save_longconv
from kvflow.model.longconv.model import LongConvForCausalLM, init_weights


def make_longconv_model(out_dir: Path, seed: int = 0, tokenizer: bool = True, **overrides: Any) -> Path:
    """A seeded random long-conv model (fp32, safetensors) with larger-than-training weights, so logits are
    far from uniform and greedy choices are not near ties."""
    shape = dict(vocab_size=512, hidden_size=64, num_layers=2, intermediate_size=128, max_position_embeddings=512,
                 kernel_length=300, squash_lambda=0.01, smooth_width=3, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = longconv_hf_config(**{**shape, **overrides})
    model = build_longconv(hf)
    init_weights(model, seed, std=0.08)
    with torch.no_grad():
        for layer in model.layers:  # kernels that reach far back, so history matters
            layer.conv.kernel.copy_(torch.randn(layer.conv.kernel.shape,
                                                generator=torch.Generator().manual_seed(seed + 1)) * 0.05)
    save_longconv(model, hf, out_dir)
    if tokenizer:
        from tests.tokenizer_utils import make_tokenizer

        make_tokenizer(out_dir, vocab_size=hf["vocab_size"])
    return out_dir


def load_reference(path: Path, dtype: torch.dtype = torch.float32) -> LongConvForCausalLM:
    """The plain PyTorch model from the directory (the loader's own path, without the engine)."""
    from kvflow.config import ModelConfig
    from kvflow.model.loader import load_model

    return load_model(ModelConfig.from_pretrained(path, dtype=dtype))


def reference_greedy(model: LongConvForCausalLM, prompt: list[int], max_new_tokens: int,
                     method: str = "fft") -> list[int]:
    """Greedy continuation by repeated full forwards (no cache): the independent reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            hidden = model.full_forward(torch.tensor([ids]), method)
            ids.append(int(model.compute_logits(hidden[0, -1]).argmax()))
    return ids[len(prompt):]
