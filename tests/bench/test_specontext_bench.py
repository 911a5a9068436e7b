"""`kvflow bench specontext` on the shipped model, small: every method runs the same prompts to the
same length, the ratios are against full attention, SpeContext's counters are read, HF generate
is timed, and the report formats and saves."""

from __future__ import annotations

import json

from kvflow.assets import default_model_path
from kvflow.bench.specontext import format_report, run_specontext_bench, save_report


def test_a_small_run_reports_every_method(tmp_path):
    model = str(default_model_path())
    results = run_specontext_bench(model, "float32", (2,), prompt_len=400, max_tokens=6, budget=96,
                                   log=lambda _: None)
    rows = {r["method"]: r for r in results["runs"]}
    assert set(rows) == {"full", "quest", "specontext", "hf-generate"}
    assert rows["full"]["vs_full"] == 1.0 and rows["full"]["same_tokens_as_full"]
    assert rows["specontext"]["specontext_overlap"] is not None and 0 <= rows["specontext"]["specontext_overlap"] <= 1
    assert rows["specontext"]["specontext_moved_bytes_per_step"] > 0
    assert rows["quest"]["specontext_overlap"] is None
    assert rows["hf-generate"]["output_tokens"] == 2 * 6
    assert results["retrieval_model"].endswith("tiny-retrieval")
    text = format_report(results)
    assert "specontext" in text and "vs hf generate" in text
    save_report(results, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["budget"] == 96
