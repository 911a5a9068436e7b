"""`kvflow train --preset smoke-longconv` end to end: a model directory the engine serves, equal to the
reference forward; tiny's tokenizer; a rerun resumes to the same weights."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from kvflow import LLM, SamplingParams
from kvflow.assets import shipped_model_path
from kvflow.train.longconv import LONGCONV_PRESETS, run_longconv_training
from tests.model.longconv.longconv_utils import load_reference, reference_greedy

PRESET = LONGCONV_PRESETS["smoke-longconv"]


def test_smoke_longconv(tmp_path):
    report = run_longconv_training(PRESET, tmp_path, show_progress=False)
    model_dir = tmp_path / PRESET.name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LongConvForCausalLM"]
    assert config["kernel_length"] == PRESET.kernel_length and config["squash_lambda"] == PRESET.squash_lambda
    assert (model_dir / "tokenizer.json").read_text() == (shipped_model_path("tiny") / "tokenizer.json").read_text()
    assert report["model"]["steps"] == PRESET.stage.steps
    assert report["model"]["kernel_parameters"] == PRESET.hidden_size * PRESET.kernel_length * PRESET.num_layers
    losses = [json.loads(line)["loss"] for line in (tmp_path / "work" / "longconv_log.jsonl").read_text().splitlines()]
    assert len(losses) == PRESET.stage.steps and all(loss == loss for loss in losses)

    llm = LLM(model=str(model_dir), dtype="float32")
    prompt = llm.get_tokenizer().encode("def add(a, b):")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference_greedy(load_reference(model_dir), prompt, 8)

    # The finished run's checkpoint is resumed, not retrained: the same weights again.
    first = load_file(str(model_dir / "model.safetensors"))
    shutil.rmtree(model_dir)
    run_longconv_training(PRESET, tmp_path, show_progress=False)
    again = load_file(str(model_dir / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
