"""`kvflow eval --compare-kv`: one evaluation per KV format, reused when saved, one table and figure."""

from __future__ import annotations

import json

from tests.eval.test_eval_end_to_end import png_size

SMALL = ["--dtype", "float32", "--num-blocks", "256", "--lengths", "96", "--depths", "0", "--trials", "1",
         "--pairs", "1", "--queries", "1", "--ppl-tokens", "256", "--ppl-context", "128", "--no-cache",
         "--no-progress", "--tasks", "perplexity,passkey"]


def test_compare_kv_formats_runs_each_once_and_plots(smoke_model, tmp_path, capsys):
    from kvflow.cli import main

    out = tmp_path / "cmp"
    args = ["eval", "--model", str(smoke_model), *SMALL, "--compare-kv", "auto,int8,fp8_e4m3", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    rows = json.loads((out / "kv_compare.json").read_text())
    assert [r["kv_cache_dtype"] for r in rows] == ["auto", "int8", "fp8_e4m3"]
    for fmt in ("auto", "int8", "fp8_e4m3"):
        saved = json.loads((out / fmt / "results.json").read_text())
        assert saved["engine"]["cache"]["kv_cache_dtype"] == fmt  # each run really used its format
    auto, int8, fp8 = rows
    assert auto["kv_bytes_ratio"] == 1.0 and fp8["kv_bytes_ratio"] == 0.25 < int8["kv_bytes_ratio"] < 0.5  # fp32 model
    assert int8["perplexity"] != auto["perplexity"]  # a lossy format changes the numbers ...
    assert abs(int8["perplexity"] / auto["perplexity"] - 1) < 0.02  # ... a little
    assert "int8" in captured.out and "Δ ppl" in captured.out
    assert png_size(out / "kv_compare.png")[0] > 300

    # A second call reuses every saved evaluation; --rerun evaluates again.
    assert main(args) == 0
    assert captured.err.count("--- kv_cache_dtype=") == 3
    assert capsys.readouterr().err.count("reusing") == 3


def test_compare_kv_refuses_unknown_formats(smoke_model, tmp_path, capsys):
    import pytest

    from kvflow.cli import main

    with pytest.raises(SystemExit, match="unknown format"):
        main(["eval", "--model", str(smoke_model), *SMALL, "--compare-kv", "auto,int3", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before any work
