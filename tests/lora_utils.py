"""LoRA adapters made with PEFT itself (the format's owner), with random non-zero B so they change outputs."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_peft_adapter(base: Path, out: Path, seed: int, rank: int = 8, alpha: int = 16,
                      targets: tuple[str, ...] = ALL_TARGETS, scale: float = 0.05, **config) -> Path:
    """A PEFT LoRA adapter for the HF model at `base`, A and B drawn with `seed` (std `scale`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def merged_hf_model(base: Path, adapter: Path):
    """PEFT's own merge of `adapter` into `base` (fp32): the independent reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
