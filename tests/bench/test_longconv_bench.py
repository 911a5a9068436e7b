"""`kvflow bench longconv` on a toy shape: every method and model is timed, state bytes are the spec's."""

from __future__ import annotations

import json

from kvflow.bench import longconv as bench
from kvflow.bench.make_model import SHAPES
from kvflow.cli import main

TOY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
           vocab_size=128, tie_word_embeddings=True, max_position_embeddings=256, rope_theta=10000.0)


def test_bench_longconv_toy(monkeypatch, tmp_path):
    monkeypatch.setitem(SHAPES, "toy", TOY)
    out = tmp_path / "longconv.json"
    assert main(["bench", "longconv", "--shape", "toy", "--lengths", "64", "300", "--contexts", "20", "70",
                 "--direct-max", "64", "--attention-max", "64", "--repeats", "1", "--engine-lengths", "40",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("kvflow bench longconv --shape toy")
    # bf16: long conv holds H values per token and layer; attention keys and values of 2 kv heads of 8.
    assert result["state_bytes_per_token"] == {"long-conv": 2 * 32 * 2, "attention": 2 * 2 * 2 * 8 * 2}
    methods = {(r["tokens"], r["method"]) for r in result["prefill"]}
    assert methods == {(64, "fft"), (64, "butterfly"), (64, "direct"), (64, "attention (SDPA, bf16)"),
                       (300, "fft"), (300, "butterfly")}
    assert {(r["context"], r["model"]) for r in result["decode"]} == {(c, m) for c in (20, 70)
                                                                      for m in ("long-conv", "attention")}
    assert all(r["tokens_per_s"] > 0 for r in result["decode"])
    assert {(r["tokens"], r["model"]) for r in result["engine_prefill"]} == {(40, "long-conv"), (40, "attention")}
    assert result["command"].endswith("--engine-lengths 40")
    assert bench.bytes_per_token(bench.longconv_config("toy", 64, "float32")) == 2 * 32 * 4


def test_bench_longconv_options(monkeypatch, tmp_path, capsys):
    """--conv-dtype reaches the timed convolutions and the command line; --device cuda without CUDA says so."""
    import torch

    monkeypatch.setitem(SHAPES, "toy", TOY)
    out = tmp_path / "longconv.json"
    assert main(["bench", "longconv", "--shape", "toy", "--lengths", "64", "--direct-max", "0", "--attention-max",
                 "0", "--repeats", "1", "--no-decode", "--conv-dtype", "bfloat16", "--device", "cpu",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["conv_dtype"] == "bfloat16" and result["command"].endswith("--no-decode --conv-dtype bfloat16")
    assert {r["method"] for r in result["prefill"]} == {"fft", "butterfly"} and "decode" not in result
    assert all(r["vs_fp64"]["rel_err"] < 1e-2 for r in result["prefill"])
    if not torch.cuda.is_available():
        assert main(["bench", "longconv", "--shape", "toy", "--device", "cuda", "--lengths", "64"]) == 2
        assert "no CUDA device" in capsys.readouterr().out


def test_butterfly_vs_fft_summary():
    rows = [{"tokens": n, "method": m, "layer_ms": ms} for n, m, ms in [
        (2048, "fft", 1.0), (2048, "butterfly (Triton)", 2.0), (8192, "fft", 3.0), (8192, "butterfly (Triton)", 1.5),
        (8192, "butterfly (Triton, plan per call)", 3.0), (32768, "fft", 8.0), (32768, "butterfly (Triton)", 4.0)]]
    summary = bench.butterfly_vs_fft(rows + [{"tokens": 32768, "method": "butterfly (Triton, plan per call)",
                                              "error": "x"}])
    assert [e["speedup"] for e in summary["by_length"]] == [0.5, 2.0, 2.0]
    assert summary["met"] is True and summary["met_plan_per_call"] is False
    assert bench.butterfly_vs_fft(rows[:2])["met"] is None
