"""`kvflow train --finetune`: a LoRA adapter in PEFT's format that the engine serves (equal to PEFT's own
merge of it), and a top-layers variant whose lower layers are bit-identical to the base."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kvflow import LLM, SamplingParams
from kvflow.train.finetune import FinetuneSettings, run_finetune
from tests.lora_utils import hf_greedy, merged_hf_model

SMALL = dict(steps=3, tokens_per_step=256, seq_len=32, eval_tokens=128, max_source_files=8)


def test_lora_finetune_writes_a_peft_adapter_the_engine_serves(smoke_run, tmp_path):
    base = smoke_run[0] / "smoke"
    out = tmp_path / "adapter"
    report = run_finetune(base, out, FinetuneSettings(slice="code", method="lora", lora_rank=4, **SMALL),
                          show_progress=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert set(report["heldout_loss_after"]) == {"prose", "code"}
    assert all(math.isfinite(v) for v in report["heldout_loss_after"].values())
    saved = load_file(out / "adapter_model.safetensors")
    assert report["trainable_parameters"] == sum(t.numel() for t in saved.values())
    llm = LLM(model=str(base), dtype="float32", enable_lora=True, max_lora_rank=4, lora_modules={"code": str(out)})
    prompt = [5, 9, 33, 71, 20]
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), lora_request="code",
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf_greedy(merged_hf_model(base, out), prompt, 6)


def test_top_layers_variant_trains_only_the_top_layers(smoke_run, tmp_path):
    base = smoke_run[0] / "smoke"
    out = tmp_path / "variant"
    run_finetune(base, out, FinetuneSettings(slice="prose", method="top-layers", top_layers=1, **SMALL),
                 show_progress=False)
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    layers = 1 + max(int(name.split(".")[2]) for name in before if name.startswith("model.layers."))
    top = f"model.layers.{layers - 1}."
    for name, tensor in before.items():
        if not (name.startswith(top) or name == "model.norm.weight"):
            assert torch.equal(tensor, after[name]), f"{name} was not to be trained"
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(top))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--slice"):
        FinetuneSettings(slice="poetry")
    with pytest.raises(ValueError, match="--method"):
        FinetuneSettings(method="full")
