"""`kvflow bench zoo` on a tiny model: variants written with only their top layer changed (the zoo keeps
exactly that layer of each), both configurations served in their own processes, the report complete."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from kvflow.bench.zoo import format_report, run_zoo_bench, write_variant
from kvflow.cli import main


def test_written_variants_change_only_their_top_layers(llama_dir, tmp_path):
    out = write_variant(llama_dir, tmp_path / "v", changed_layers=1, seed=3)
    before, after = load_file(llama_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not before[name].equal(after[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed)


def test_bench_reports_zoo_against_separate_engines(llama_dir, tmp_path):
    report = run_zoo_bench(llama_dir, (2,), changed_layers=1, requests=2, prompt_len=8, max_tokens=4,
                           dtype="float32", work=tmp_path)
    row = report["results"][0]
    assert row["zoo"]["processes"] == 1 and row["separate"]["processes"] == 2
    for label in ("zoo", "separate"):
        assert row[label]["latency_p95_s"] >= row[label]["latency_p50_s"] > 0
        assert row[label]["output_tok_s"] > 0
    # The zoo holds the base once plus one layer per variant; two engines hold two whole models.
    assert row["zoo"]["weight_mib"] < row["separate"]["weight_mib"]
    assert set(row["zoo"]["variant_unique_mib"]) == {"v0", "v1"}
    assert "zoo/separate" in format_report(report)
    out = tmp_path / "r.json"
    assert main(["bench", "zoo", "--model", str(llama_dir), "--dtype", "float32", "--variants", "2", "--requests",
                 "1", "--prompt-len", "4", "--max-tokens", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["variants"] == 2


def test_a_system_prompt_shows_the_kv_the_zoo_shares(llama_dir, tmp_path):
    """Every variant shares layer 0 of 2 with the base: with sharing, the system prompt's layer-0 KV is held once
    for both variants, so the zoo holds less KV at its peak than the zoo with each variant's KV its own."""
    report = run_zoo_bench(llama_dir, (2,), changed_layers=1, requests=2, prompt_len=8, max_tokens=4,
                           dtype="float32", work=tmp_path, system_prompt_len=64)
    row = report["results"][0]
    assert row["zoo"]["kv_layer_groups"] == 2 and row["zoo-private-kv"]["kv_layer_groups"] == 1
    # Peak pages: both variants' four requests hold the 4 system-prompt blocks (and 1 block each of their own
    # tokens): 4 shared + 2 x 4 own pages + 4 x 2 of the requests, against 2 x 4 x 2 + 4 x 2.
    assert row["zoo"]["kv_peak_mib"] * 24 == row["zoo-private-kv"]["kv_peak_mib"] * 20
    assert "zoo-private-kv" in format_report(report)
