"""The shipped default model and its draft: loadable by transformers and by our engine, which
agree token for token (greedy, fp32), and small enough to ship."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvflow import LLM, SamplingParams
from kvflow.assets import ASSETS, default_draft_path, default_model_path
from tests.model_utils import hf_greedy

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass ", "The pass key is 40217. Remember it."]


def test_assets_fit_the_size_budget():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"{total / 2**20:.1f} MiB"


@pytest.mark.parametrize("path_fn", [default_model_path, default_draft_path], ids=["tiny", "tiny-draft"])
def test_engine_matches_transformers_greedy_fp32(path_fn):
    path = path_fn()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=str(path), dtype="float32", num_blocks=64)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 16)


def test_cli_generate_uses_the_shipped_model_by_default(capsys):
    from kvflow.cli import main

    assert main(["generate", "--prompt", "def add(a, b):", "--max-tokens", "8", "--temperature", "0", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "def add(a, b):" and len(line["token_ids"]) >= 1
