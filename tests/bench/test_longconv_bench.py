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
