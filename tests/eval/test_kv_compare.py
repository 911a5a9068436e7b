"""`kvflow eval --compare-kv`: one evaluation per KV method (format, policy@fraction or both), reused when
saved, one table and figure; `--kv-budget-fraction` on a plain evaluation."""

from __future__ import annotations

import json
import re

import pytest

from kvflow.eval.report import PPL_PREFILL_NOTE
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
    assert _runs(captured.err) == ["auto", "int8", "fp8_e4m3"]
    assert capsys.readouterr().err.count("reusing") == 3


def _runs(err: str) -> list[str]:
    """The methods a compare evaluated (not reused), from its log."""
    return [line[4:] for line in err.splitlines() if line.startswith("--- ") and "reusing" not in line]


def test_compare_kv_with_kivi_pages_its_methods_in_blocks_of_32(smoke_model, tmp_path, capsys):
    from kvflow.cli import main

    out = tmp_path / "cmp"
    # R = 32, so 96- and 128-token prompts hold quantised groups
    args = ["eval", "--model", str(smoke_model), *SMALL, "--kv-residual-tokens", "32", "--compare-kv",
            "auto,kivi4,kivi2", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "note: kivi4 pages in blocks of 32 tokens" in captured.err and "note: auto" not in captured.err
    rows = {r["method"]: r for r in json.loads((out / "kv_compare.json").read_text())}
    for fmt, block in (("auto", 16), ("kivi4", 32), ("kivi2", 32)):
        cache = json.loads((out / fmt / "results.json").read_text())["engine"]["cache"]
        assert (cache["kv_cache_dtype"], cache["block_size"]) == (fmt, block)
        assert rows[fmt]["passkey"] is not None
    # smoke: head_dim 32, so per 32 channels one fp16 scale and zero (4 bytes) beside 16 (kivi4) or 8 (kivi2)
    assert rows["kivi4"]["kv_bytes_ratio"] == (16 + 4) / (32 * 4) and rows["kivi2"]["kv_bytes_ratio"] == 12 / 128
    assert rows["kivi2"]["kv_ring_tokens"] == 64 and rows["auto"]["kv_ring_tokens"] == 0
    assert "kivi2" in captured.out


def test_plain_eval_with_kivi_pages_in_blocks_of_32(smoke_model, tmp_path, capsys):
    from kvflow.cli import main

    out = tmp_path / "kivi"
    assert main(["eval", "--model", str(smoke_model), *SMALL, "--kv-cache-dtype", "kivi2", "--kv-residual-tokens",
                 "32", "--out", str(out)]) == 0
    assert "(--block-size 32)" in capsys.readouterr().err
    cache = json.loads((out / "results.json").read_text())["engine"]["cache"]
    assert (cache["kv_cache_dtype"], cache["block_size"]) == ("kivi2", 32)


def test_compare_kv_refuses_unknown_formats(smoke_model, tmp_path, capsys):
    from kvflow.cli import main

    with pytest.raises(SystemExit, match="unknown format"):
        main(["eval", "--model", str(smoke_model), *SMALL, "--compare-kv", "auto,int3", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before any work


def test_compare_kv_policies_at_budget_fractions(smoke_model, tmp_path, capsys):
    from kvflow.cli import main

    out = tmp_path / "cmp"
    methods = "auto,snapkv@0.5,quest@0.25,int8+streaming@.5"
    args = ["eval", "--model", str(smoke_model), *SMALL, "--compare-kv", methods, "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert _runs(captured.err) == ["auto", "snapkv@0.5", "quest@0.25", "int8+streaming@0.5"]
    rows = {r["method"]: r for r in json.loads((out / "kv_compare.json").read_text())}
    assert list(rows) == ["auto", "snapkv@0.5", "quest@0.25", "int8+streaming@0.5"]
    int8 = (32 + 4) / (32 * 4)  # the smoke model's head_dim 32: int8 rows and a float scale, over fp32 rows
    assert (rows["snapkv@0.5"]["kv_kept_ratio"], rows["snapkv@0.5"]["kv_read_ratio"]) == (0.5, 0.5)
    # quest keeps all KV plus each block's key min and max (one token's K and V per 16-token block), reads 1/4
    assert (rows["quest@0.25"]["kv_kept_ratio"], rows["quest@0.25"]["kv_read_ratio"]) == (1.0625, 0.25)
    assert rows["int8+streaming@0.5"]["kv_kept_ratio"] == rows["int8+streaming@0.5"]["kv_read_ratio"] == int8 / 2

    # Each method ran on the engine it names, and each request got max(floor, round(F x prompt)) tokens.
    for folder, fmt, policy, fraction, floor in (("snapkv-0.5", "auto", "snapkv", 0.5, 36),
                                                 ("quest-0.25", "auto", "quest", 0.25, 4),
                                                 ("int8-streaming-0.5", "int8", "streaming", 0.5, 5)):
        saved = json.loads((out / folder / "results.json").read_text())
        cache = saved["engine"]["cache"]
        assert (cache["kv_cache_dtype"], cache["kv_policy"], cache["kv_budget"]) == (fmt, policy, floor)
        assert saved["config"]["kv_budget_fraction"] == fraction
        budget = saved["kv_budget"]
        assert (budget["policy"], budget["fraction"], budget["floor"]) == (policy, fraction, floor)
        lengths = [s["prompt_tokens"] for s in saved["passkey"]["samples"]]
        kept = sum(min(n, max(floor, round(fraction * n))) for n in lengths) / sum(lengths)
        assert budget["kept_share"]["passkey"] == pytest.approx(kept) and budget["kept_share"]["multikey"] is None
        assert rows[_name(fmt, policy, fraction)]["kept_share"] == budget["kept_share"]
    # Perplexity comes from prefill, where snapkv and quest do not act: the same as the full cache.
    assert rows["snapkv@0.5"]["perplexity"] == pytest.approx(rows["auto"]["perplexity"], rel=1e-4)
    assert rows["quest@0.25"]["perplexity"] == pytest.approx(rows["auto"]["perplexity"], rel=1e-6)
    assert "quest@0.25" in captured.out and PPL_PREFILL_NOTE in captured.out
    assert png_size(out / "kv_compare.png")[0] > 300

    # Reuse: everything again; other sinks change what a policy keeps, so only the plain format is reused.
    assert main(args) == 0
    assert _runs(capsys.readouterr().err) == []
    assert main([*args, "--kv-sink-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert _runs(captured.err) == ["snapkv@0.5", "quest@0.25", "int8+streaming@0.5"]
    assert captured.err.count("reusing") == 1
    assert json.loads((out / "quest-0.25" / "results.json").read_text())["kv_budget"]["floor"] == 8


def _name(fmt: str, policy: str, fraction: float) -> str:
    return f"{policy}@{fraction:g}" if fmt == "auto" else f"{fmt}+{policy}@{fraction:g}"


@pytest.mark.parametrize("extra, message", [
    (["--compare-kv", "auto,snapkv"], "snapkv needs a budget fraction"),
    (["--compare-kv", "auto,snapkv@0.25,snapkv@.25"], "repeats"),
    (["--compare-kv", "auto,snapkv@0.5", "--kv-policy", "h2o", "--kv-budget", "64"],
     "drop --kv-budget, --kv-policy"),
    (["--compare-kv", "auto,snapkv@0.5", "--kv-sink-tokens", "-1"], "--compare-kv auto: kv_sink_tokens must be >= 0"),
    (["--kv-budget-fraction", "0.5"], "add --kv-policy"),
    (["--kv-budget-fraction", "1.5", "--kv-policy", "snapkv"], "must be in (0, 1]"),
])
def test_bad_policy_settings_fail_before_any_run(smoke_model, tmp_path, extra, message):
    from kvflow.cli import main

    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["eval", "--model", str(smoke_model), *SMALL, *extra, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_eval_with_a_budget_fraction(smoke_model, tmp_path, capsys):
    from kvflow.cli import main

    out = tmp_path / "quest"
    assert main(["eval", "--model", str(smoke_model), *SMALL, "--kv-policy", "quest", "--kv-budget-fraction", "0.25",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kv policy: quest, each request's kv_budget = max(4, round(0.25 x prompt tokens))" in printed
    assert PPL_PREFILL_NOTE in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["kv_budget_fraction"] == 0.25 and saved["engine"]["cache"]["kv_budget"] == 4
    assert saved["kv_budget"]["kept_share"]["perplexity"] == pytest.approx(0.25, abs=0.01)
