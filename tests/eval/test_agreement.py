"""Draft-vs-teacher agreement: the engine's top-1 tokens equal transformers' argmax, and the
agreement is computed from them exactly."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kvflow import LLM
from kvflow.eval.agreement import draft_agreement, engine_argmax


def _hf_argmax(model_dir, windows):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([w])).logits[0, :-1].argmax(-1).tolist() for w in windows]


def test_agreement_matches_a_transformers_reference(smoke_run):
    out, _ = smoke_run
    rng = np.random.default_rng(0)
    windows = [[1] + rng.integers(5, 300, size=n).tolist() for n in (40, 17, 64)]
    teacher = LLM(model=str(out / "smoke"), dtype="float32", num_blocks=64)
    draft = LLM(model=str(out / "smoke-draft"), dtype="float32", num_blocks=64)

    top1, _ = engine_argmax(teacher, windows)
    assert top1 == _hf_argmax(out / "smoke", windows)

    result = draft_agreement(teacher, draft, windows)
    t = np.concatenate(_hf_argmax(out / "smoke", windows))
    d = np.concatenate(_hf_argmax(out / "smoke-draft", windows))
    truth = np.concatenate([w[1:] for w in windows])
    assert result["positions"] == len(truth)
    assert result["agreement"] == float((t == d).mean())
    assert result["teacher_top1_accuracy"] == float((t == truth).mean())
    assert result["draft_parameters"] < result["teacher_parameters"]
    assert draft_agreement(draft, draft, windows)["agreement"] == 1.0
