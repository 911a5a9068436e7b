"""`kvflow eval` on the smoke model (small grid): files, structure and sane values; heat maps are PNGs."""

from __future__ import annotations

import json
import math
import struct

import pytest

from kvflow.eval import EvalConfig
from kvflow.eval.heatmap import save_heatmap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_heatmap_is_a_valid_png(tmp_path):
    path = save_heatmap(tmp_path / "sub" / "grid.png", [[1.0, 0.5, None], [0.0, 0.25, 1.0]],
                        ["0", "1"], ["128", "256", "512"], "title\nsubtitle", "length", "depth")
    width, height = png_size(path)
    assert width > 100 and height > 100
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_cli_eval_on_smoke_model(smoke_model, tmp_path, capsys):
    from kvflow.cli import main

    out = tmp_path / "eval"
    code = main(["eval", "--model", str(smoke_model), "--dtype", "float32", "--num-blocks", "512",
                 "--lengths", "96,160", "--depths", "0,1", "--trials", "2", "--pairs", "1,3",
                 "--queries", "2", "--ppl-tokens", "1024", "--ppl-context", "256", "--out", str(out),
                 "--no-cache", "--no-progress", "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "unigram baseline:" in printed and "passkey accuracy" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(smoke_model)
    engine = results["engine"]
    assert engine["dtype"] == "float32" and engine["num_kv_blocks"] == 512
    assert engine["cache"]["enable_prefix_caching"] is True and "scheduler" in engine
    assert results["config"]["seed"] == 3
    assert results["corpus"]["split_source"] == "train_report.json" and results["corpus"]["heldout_percent"] == 10

    ppl = results["perplexity"]
    vocab = ppl["unigram"]["vocab_size"]
    assert ppl["num_tokens"] == 1024 and ppl["num_windows"] == math.ceil(1024 / 255) and ppl["context"] == 256
    assert 1.0 < ppl["perplexity"] < 5 * vocab and ppl["bits_per_byte"] > 0
    # a unigram model is at most as perplexed as a uniform one over the vocabulary
    assert 1.0 < ppl["unigram"]["perplexity"] < vocab and ppl["unigram"]["bits_per_byte"] > 0
    assert ppl["perplexity_ratio_to_unigram"] == pytest.approx(ppl["perplexity"] / ppl["unigram"]["perplexity"])

    for task, rows_key, rows in (("passkey", "depths", [0.0, 1.0]), ("multikey", "pairs", [1, 3])):
        grid = results[task]
        assert grid[rows_key] == rows and grid["lengths"] == [96, 160] == grid["effective_lengths"]
        assert len(grid["accuracy"]) == len(rows) and all(len(r) == 2 for r in grid["accuracy"])
        assert all(v is None or 0.0 <= v <= 1.0 for r in grid["accuracy"] for v in r)
        assert all(isinstance(s["correct"], bool) and s["generated"] is not None for s in grid["samples"])
        saved = json.loads((out / f"{task}.json").read_text())
        assert saved["accuracy"] == grid["accuracy"] and saved["engine"] == engine
        png_size(out / f"{task}.png")
    assert results["passkey"]["num_prompts"] == 2 * 2 * 2
    assert all(s["prompt_tokens"] == s["length"] for s in results["passkey"]["samples"])


def test_results_do_not_depend_on_engine_settings(smoke_model, smoke_llm, smoke_tokenizer, heldout_stream):
    """The prompts are fixed by the seed; greedy answers agree with prefix caching off and a small cache."""
    from kvflow import LLM
    from kvflow.eval.retrieval import engine_generate_fn, run_multikey, run_passkey
    from kvflow.eval.runner import engine_settings
    from kvflow.train.synthetic import RetrievalTasks

    tasks = RetrievalTasks(smoke_tokenizer, filler=heldout_stream)
    other = LLM(model=str(smoke_model), dtype="float32", num_blocks=24, max_num_seqs=3, enable_prefix_caching=False)
    settings = engine_settings(other)
    assert settings["cache"]["enable_prefix_caching"] is False and settings["num_kv_blocks"] == 24
    runs = []
    for llm in (smoke_llm, other):
        generate = engine_generate_fn(llm)
        runs.append((run_passkey(tasks, generate, (128,), (0.0, 1.0), 2, 512, seed=5),
                     run_multikey(tasks, generate, (128,), (2,), 1, 2, 512, seed=5)))
    for ours, theirs in zip(*runs):
        assert [s["answer"] for s in ours["samples"]] == [s["answer"] for s in theirs["samples"]]
        assert [s["generated"] for s in ours["samples"]] == [s["generated"] for s in theirs["samples"]]


def test_config_is_validated():
    with pytest.raises(ValueError, match="tasks"):
        EvalConfig(tasks=("perplexity", "mmlu"))
    with pytest.raises(ValueError, match="depths"):
        EvalConfig(depths=(0.5, 1.5))
