"""`kvflow bench spec-decode`: tokens/s with and without speculation, acceptance, mean accepted length,
the greedy-output check; `--verify-cost`: a verification step against a decode step."""

from __future__ import annotations

import json

from kvflow.cli import main


def test_spec_decode_bench_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "sd.json"
    code = main(["bench", "spec-decode", "--workload", "edit", "--method", "none", "ngram",
                 "--num-speculative-tokens", "2", "3", "--batch", "1", "2", "--max-tokens", "12", "--prompt-len",
                 "96", "--num-prompts", "2", "--repeats", "2", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "ngram K=3" in text and "every speculative run gave the `none` run's tokens" in text
    report = json.loads(out.read_text())
    assert report["outputs_equal"] is True
    assert report["settings"]["workload"] == "edit" and report["settings"]["prompts_per_run"] == {"1": 2, "2": 2}
    rows = {(r["method"], r["k"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {(m, k, b) for m, k in [("none", 0), ("ngram", 2), ("ngram", 3)] for b in (1, 2)}
    for (method, k, _), r in rows.items():
        assert r["output_tokens_per_s"] > 0 and len(r["tokens_per_s_runs"]) == 2
        assert r["outputs_equal_none"] is True and r["mismatched_sequences"] == 0
        if method == "none":
            assert r["ratio_to_none"] == 1.0 and r["acceptance_rate"] is None
            continue
        assert r["ratio_to_none"] > 0
        # The edit prompts hold the function being rewritten: prompt lookup proposes and is accepted.
        assert 0 < r["acceptance_rate"] <= 1 and 1 < r["mean_accepted_length"] <= k + 1
        assert len(r["accepted_per_position"]) == k
        assert abs(sum(r["accepted_per_position"]) + 1 - r["mean_accepted_length"]) < 1e-9


def test_verify_cost(llama_dir, tmp_path, capsys):
    out = tmp_path / "cost.json"
    code = main(["bench", "spec-decode", "--verify-cost", "--model", str(llama_dir), "--dtype", "float32",
                 "--num-speculative-tokens", "2", "4", "--batch", "1", "2", "--context-len", "16", "--steps", "2",
                 "--repeats", "1", "--out", str(out)])
    assert code == 0
    assert "vs decode" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["k"], r["positions"]) for r in rows] == [(b, k, k + 1) for b in (1, 2) for k in (0, 2, 4)]
    assert all(r["step_ms"] > 0 and r["verified_per_step"] == r["k"] for r in rows)
    assert all(r["ratio_to_decode"] == 1.0 for r in rows if r["k"] == 0)
