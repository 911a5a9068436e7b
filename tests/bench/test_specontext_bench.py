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


def test_cli_options():
    """--device (cpu default, cuda) and --shape (the reference shapes) parse; others are refused."""
    import pytest

    from kvflow.cli import build_parser

    parser = build_parser("bench")
    args = parser.parse_args(["bench", "specontext"])
    assert args.device == "cpu" and args.shape is None
    args = parser.parse_args(["bench", "specontext", "--device", "cuda", "--shape", "135m", "--batch", "1", "16"])
    assert args.device == "cuda" and args.shape == "135m" and args.batch == [1, 16]
    for bad in (["--device", "tpu"], ["--shape", "7b"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "specontext", *bad])


def test_cli_shape_builds_a_model(monkeypatch, tmp_path, capsys):
    """--shape without --model writes a random-weight model of that shape, its context stretched past the
    shape's own (512) to hold the prompt and its outputs, with a random retrieval head of its layout;
    --device cuda without CUDA says so and exits 2."""
    import torch

    from kvflow.bench.make_model import SHAPES, TEST_SHAPES
    from kvflow.cli import main

    monkeypatch.setitem(SHAPES, "toy", TEST_SHAPES["tiny"])
    out = tmp_path / "r.json"
    assert main(["bench", "specontext", "--shape", "toy", "--device", "cpu", "--batch", "1", "--prompt-len", "600",
                 "--max-tokens", "3", "--budget", "32", "--repeats", "1", "--no-hf", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"].startswith("random-weight toy") and report["device"] == "cpu"
    assert report["retrieval_model"] == "random weights (costs only)" and "partial" not in report
    assert set(report["attention_backend"]) == {"full", "quest", "specontext"}
    assert {r["method"] for r in report["runs"]} == {"full", "quest", "specontext"}
    assert "random-weight toy" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["bench", "specontext", "--shape", "toy", "--device", "cuda", "--out", str(out)]) == 2
        assert "no CUDA device" in capsys.readouterr().out


def test_the_edge_setting_reports_how_far_each_engine_gets_in_the_memory(tmp_path):
    """`--resident-memory`: full attention in a cache of the cap stops early (finish reason length);
    SpeContext under the cap generates everything, the same tokens as uncapped, within the cap by the
    model's count and by the kernel's."""
    from kvflow.bench.specontext_edge import format_edge_report, run_edge_bench

    cap = 0.0015  # GiB: ~390 of tiny's 4 KiB tokens
    results = run_edge_bench(str(default_model_path()), "float32", prompt_len=256, max_tokens=400, budget=128,
                             cap_gib=cap, spill_dir=str(tmp_path), sample_every=8, log=lambda _: None)
    rows = {r["engine"]: r for r in results["runs"]}
    assert rows["full, capped"]["finish_reason"] == "length"
    assert 100 < rows["full, capped"]["output_tokens"] < 400 - 200  # 256 + ~130 tokens fill the cache
    for name in ("specontext, capped", "specontext", "full"):
        assert rows[name]["output_tokens"] == 400
    capped = rows["specontext, capped"]
    assert results["capped_tokens_equal_uncapped"]
    assert 0 < capped["peak_measured_bytes"] <= capped["peak_model_bytes"] <= results["cap_bytes"]
    assert capped["offloaded_bytes"] > 0 and capped["tier_read_entries"] > 0 and capped["over_cap_steps"] == 0
    assert rows["specontext"]["peak_held_bytes"] > results["cap_bytes"]  # uncapped, it needs more
    assert "specontext, capped" in format_edge_report(results)
