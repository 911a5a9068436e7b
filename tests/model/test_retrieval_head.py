"""The shipped retrieval head (`kvflow/assets/tiny-retrieval`): its layout is the shipped tiny's
(one selection per KV head, the tiny's vocabulary and embedding width), it holds more than 90 %
fewer parameters than the distilled draft, `--kv-policy specontext` alone picks it for tiny; and a
directory round-trips through save and load, bad ones refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from kvflow import LLM, SamplingParams
from kvflow.assets import default_draft_path, default_model_path, default_retrieval_path
from kvflow.model.retrieval_head import (
    RetrievalHead,
    RetrievalHeadConfig,
    load_retrieval_head,
    save_retrieval_head,
)


def _parameters(path) -> int:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() for k in f.keys())


def test_the_shipped_head_fits_tiny_and_is_a_tenth_of_the_draft():
    tiny = json.loads((default_model_path() / "config.json").read_text())
    head = RetrievalHeadConfig.from_dir(default_retrieval_path())
    assert (head.vocab_size, head.hidden_size, head.num_kv_heads) == (
        tiny["vocab_size"], tiny["hidden_size"], tiny["num_key_value_heads"])
    assert _parameters(default_retrieval_path()) < 0.1 * _parameters(default_draft_path())
    report = json.loads((default_retrieval_path() / "train_report.json").read_text())
    assert report["parameters"] == _parameters(default_retrieval_path())


def test_specontext_alone_uses_the_shipped_head_on_tiny():
    llm = LLM(str(default_model_path()), kv_policy="specontext", kv_budget=80, num_blocks=64)
    out = llm.generate(["def add(a, b):\n    " * 12], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 24
    assert llm.engine.core.stats().specontext_steps > 0
    assert llm.engine.core.runner.retrieval_head.config == RetrievalHeadConfig.from_dir(default_retrieval_path())


def test_a_head_round_trips_and_bad_directories_are_refused(tmp_path):
    torch.manual_seed(0)
    head = RetrievalHead(RetrievalHeadConfig(vocab_size=40, hidden_size=12, num_kv_heads=2, embed_dim=4, window=3,
                                             head_dim=8))
    save_retrieval_head(head, tmp_path / "head")
    embedding = torch.randn(40, 12)
    back = load_retrieval_head(tmp_path / "head", embedding)
    assert back.config == head.config
    head.attach_embedding(embedding)
    windows, positions = torch.randint(-1, 40, (5, 3)), torch.arange(5)
    assert torch.equal(back.keys(windows, positions), head.keys(windows, positions))
    with pytest.raises(ValueError, match="is not a retrieval head directory: cannot read config.json"):
        load_retrieval_head(tmp_path, embedding)
    (tmp_path / "head" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_retrieval_head(tmp_path / "head", embedding)
