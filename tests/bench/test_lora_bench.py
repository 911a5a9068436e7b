"""`kvflow bench lora` on a tiny model: its random adapters are in PEFT's format (PEFT loads them and its
merge gives the engine's tokens), the LoRA-on engine without adapters gives the base's tokens, and the
adapters change outputs (so the throughput compared is of real adapted requests)."""

from __future__ import annotations

import json

from kvflow.bench.lora import format_report, run_lora_bench, write_random_adapter
from kvflow.cli import main
from tests.lora_utils import hf_greedy, merged_hf_model


def test_random_adapters_are_peft_adapters(llama_dir, tmp_path):
    from kvflow import LLM, SamplingParams

    path = write_random_adapter(llama_dir, tmp_path / "a", rank=4, seed=1, scale=0.2)
    llm = LLM(model=str(llama_dir), dtype="float32", enable_lora=True, lora_modules={"a": str(path)})
    prompt = [3, 40, 41, 200, 7]
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), lora_request="a",
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf_greedy(merged_hf_model(llama_dir, path), prompt, 6)


def test_bench_reports_every_configuration(llama_dir, tmp_path, capsys):
    report = run_lora_bench(llama_dir, "float32", batch=4, num_adapters=2, rank=4, prompt_len=8, max_tokens=4,
                            repeats=1, adapter_dir=tmp_path)
    assert set(report["results"]) == {"base", "lora-base", "lora-2"}
    assert report["lora_base_equals_base"] is True
    assert report["adapters_change_outputs"] > 0
    assert report["results"]["base"]["vs_base"] == 1.0
    assert "lora-2" in format_report(report)
    out = tmp_path / "r.json"
    assert main(["bench", "lora", "--model", str(llama_dir), "--dtype", "float32", "--batch", "2", "--adapters", "2",
                 "--rank", "2", "--prompt-len", "4", "--max-tokens", "2", "--repeats", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["adapters"] == 2


def test_bench_shape_builds_a_model(monkeypatch, tmp_path, capsys):
    """--shape without --model writes a random-weight model of that shape; --device cuda without CUDA says so."""
    import torch

    from kvflow.bench.make_model import SHAPES, TEST_SHAPES

    monkeypatch.setitem(SHAPES, "toy", TEST_SHAPES["tiny"])
    out = tmp_path / "r.json"
    assert main(["bench", "lora", "--shape", "toy", "--device", "cpu", "--dtype", "float32", "--batch", "2",
                 "--adapters", "2", "--rank", "2", "--prompt-len", "4", "--max-tokens", "2", "--repeats", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"].startswith("random-weight toy") and report["device"] == "cpu"
    if not torch.cuda.is_available():
        assert main(["bench", "lora", "--shape", "toy", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().out
