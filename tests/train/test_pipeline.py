"""`kvflow train --preset smoke` end to end: loadable by transformers and by our engine, which agree;
an interrupted run resumes to the same weights; the run is reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvflow import LLM, SamplingParams
from kvflow.train.corpus import load_token_stream
from kvflow.train.data import TrainingBatches
from kvflow.train.pipeline import build_model, run_training
from kvflow.train.presets import PRESETS
from kvflow.train.synthetic import RetrievalTasks
from kvflow.train.trainer import cross_entropy_loss, train_stage
from tests.model_utils import hf_greedy


def test_outputs_are_hf_directories_with_report(smoke_run):
    out, report = smoke_run
    for name in ("smoke", "smoke-draft"):
        d = out / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "train_report.json"):
            assert (d / f).exists(), f
        config = json.loads((d / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
    assert report["teacher"]["steps"] == PRESETS["smoke"].teacher_stage.steps
    assert report["draft"]["parameters"] < report["teacher"]["parameters"] / 2
    teacher_log = (out / "work" / "teacher_log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in teacher_log]
    assert len(losses) == PRESETS["smoke"].teacher_stage.steps
    assert losses[-1] < losses[0]  # it learns
    extension_log = (out / "work" / "extension_log.jsonl").read_text().splitlines()
    extension = PRESETS["smoke"].extension_stage
    assert report["extension"]["steps"] == extension.steps == len(extension_log)
    assert {json.loads(line)["seq_len"] for line in extension_log} == {extension.seq_len_schedule[-1][1]}


def test_tokenizer_loads_in_transformers_with_chat_template(smoke_run):
    out, _ = smoke_run
    tok = AutoTokenizer.from_pretrained(out / "smoke")
    assert tok.model_max_length == PRESETS["smoke"].model.max_position_embeddings
    ids = tok("x = 1234")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert [tok.decode([i]) for i in ids[-4:]] == ["1", "2", "3", "4"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["smoke", "smoke-draft"])
def test_engine_and_transformers_agree_greedy_fp32(smoke_run, name):
    out, _ = smoke_run
    tok = AutoTokenizer.from_pretrained(out / name)
    hf = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
    llm = LLM(model=str(out / name), dtype="float32", num_blocks=64)
    prompts = [tok(p)["input_ids"] for p in ("def f(x):\n    return", "import os\n", "The pass key is 12345.")]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def test_rerun_gives_identical_weights(smoke_run, tmp_path):
    out, _ = smoke_run
    reference = load_file(out / "smoke" / "model.safetensors")
    run_training(PRESETS["smoke"], tmp_path, show_progress=False)
    rerun = load_file(tmp_path / "smoke" / "model.safetensors")
    assert reference.keys() == rerun.keys()
    for key in reference:
        torch.testing.assert_close(rerun[key], reference[key], rtol=0, atol=0)


class _Interrupting:
    """Batches that raise KeyboardInterrupt when asked for step `at` (like Ctrl-C mid-run)."""

    def __init__(self, batches, at: int) -> None:
        self.batches, self.at = batches, at

    def batch(self, step, batch_size, seq_len):
        if step == self.at:
            raise KeyboardInterrupt
        return self.batches.batch(step, batch_size, seq_len)


def test_interrupted_training_resumes_to_the_same_weights(smoke_run, tmp_path):
    out, _ = smoke_run
    preset = PRESETS["smoke"]
    tokenizer = AutoTokenizer.from_pretrained(out / "work" / "tokenizer")
    stream = load_token_stream(tokenizer, [], out / "work" / "train_tokens.npy")
    batches = TrainingBatches(RetrievalTasks(tokenizer, stream), stream, preset.mix, preset.seed)
    stage, every = preset.teacher_stage, preset.checkpoint_every

    straight = build_model(preset.model, tokenizer, preset.seed)
    train_stage(straight, batches, stage, tmp_path / "a.ckpt", cross_entropy_loss, "a", every, show_progress=False)

    resumed = build_model(preset.model, tokenizer, preset.seed)
    with pytest.raises(KeyboardInterrupt):
        train_stage(resumed, _Interrupting(batches, every + 2), stage, tmp_path / "b.ckpt", cross_entropy_loss,
                    "b", every, show_progress=False)
    assert torch.load(tmp_path / "b.ckpt", weights_only=True)["step"] == every
    fresh = build_model(preset.model, tokenizer, preset.seed + 99)  # different init: the checkpoint must win
    result = train_stage(fresh, batches, stage, tmp_path / "b.ckpt", cross_entropy_loss, "b", every,
                         show_progress=False)
    assert result.steps == stage.steps
    for (name, a), (_, b) in zip(straight.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_checkpoint_of_other_settings_is_refused(smoke_run, tmp_path):
    """Changing a stage upstream invalidates the checkpoints downstream of it, and only those."""
    from dataclasses import replace

    preset = PRESETS["smoke"]
    changed_draft = replace(preset, draft_stage=replace(preset.draft_stage, lr=1e-4)).fingerprints()
    changed_teacher = replace(preset, teacher_stage=replace(preset.teacher_stage, lr=1e-4)).fingerprints()
    same = preset.fingerprints()
    assert changed_draft["teacher"] == same["teacher"] and changed_draft["extension"] == same["extension"]
    assert changed_draft["draft"] != same["draft"]
    assert all(changed_teacher[k] != same[k] for k in same)

    out, _ = smoke_run
    tokenizer = AutoTokenizer.from_pretrained(out / "work" / "tokenizer")
    stream = load_token_stream(tokenizer, [], out / "work" / "train_tokens.npy")
    batches = TrainingBatches(RetrievalTasks(tokenizer, stream), stream, preset.mix, preset.seed)
    ckpt = tmp_path / "t.ckpt"
    ckpt.write_bytes((out / "work" / "teacher.ckpt").read_bytes())
    model = build_model(preset.model, tokenizer, preset.seed)
    with pytest.raises(ValueError, match="different training settings"):
        train_stage(model, batches, preset.teacher_stage, ckpt, cross_entropy_loss, "t", show_progress=False,
                    fingerprint=changed_teacher["teacher"])
    result = train_stage(model, batches, preset.teacher_stage, ckpt, cross_entropy_loss, "t", show_progress=False,
                         fingerprint=same["teacher"])
    assert result.steps == preset.teacher_stage.steps  # the matching run resumes (here: already done)
