"""Tiny random-weight Hugging Face models of every supported architecture, for parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_BASE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# Per-architecture switches that exercise what makes each one different.
_VARIANTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "mistral": dict(sliding_window=24, num_key_value_heads=1),  # MQA + sliding window
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v bias is built in
    "qwen3": dict(head_dim=32, rope_scaling={"rope_type": "linear", "factor": 2.0}),  # q/k norm
}


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, tokenizer: bool = True, **overrides: Any) -> Path:
    """Save a seeded random `arch` model (fp32, safetensors) with a small trained tokenizer."""
    import transformers

    cls_name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForCausalLM")
    kwargs = {**_BASE, **_VARIANTS[arch], **overrides}
    config = config_cls(**kwargs)
    config.architectures = [f"{cls_name}ForCausalLM"]
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # larger-than-default weights so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 1 and p.shape[0] in (config.hidden_size, getattr(config, "head_dim", 0) or -1):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # norms
            else:
                p.normal_(0.0, 0.08)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer:
        from tests.tokenizer_utils import make_tokenizer

        make_tokenizer(out_dir, vocab_size=config.vocab_size)
    return out_dir


def load_hf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_hf_with_attention(path: Path | str, name: str, attention) -> Any:
    """An HF model whose attention layers call `attention` (registered under `name`, with HF's SDPA
    mask): the reference for what a KV policy or format lets each query see."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model = load_hf(Path(path))
    model.set_attn_implementation(name)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by repeated full forward passes (no HF cache: an independent reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]
