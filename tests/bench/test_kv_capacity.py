"""`kvflow bench kv-capacity`: formats at one memory budget, blocks and sequences that fit, a run that uses them."""

from __future__ import annotations

import json

from kvflow.cli import main


def test_kv_capacity_counts_and_runs_each_format(llama_dir, tmp_path, capsys):
    out = tmp_path / "cap.json"
    code = main(["bench", "kv-capacity", "--model", str(llama_dir), "--dtype", "float32", "--kv-cache-dtype",
                 "float32", "int8", "fp8_e4m3", "--kv-cache-memory", "0.00005", "--num-prompts", "6",
                 "--input-len", "40", "--output-len", "4", "--output", str(out)])
    assert code == 0
    assert "x first" in capsys.readouterr().out
    results = {r["kv_cache_dtype"]: r for r in json.loads(out.read_text())["results"]}
    dense, int8, fp8 = results["float32"], results["int8"], results["fp8_e4m3"]
    for r in (dense, int8, fp8):
        blocks_per_seq = -(-44 // r["block_size"])
        assert r["fits"] == r["num_blocks"] // blocks_per_seq
        assert r["token_capacity"] == r["num_blocks"] * r["block_size"]
        assert 1 <= r["max_running"] <= 6 and r["output_tokens_per_s"] > 0
    assert dense["fits"] < int8["fits"] <= fp8["fits"]  # a quarter of the bytes, about 4x the sequences
    assert int8["max_running"] > dense["max_running"]
    assert dense["num_blocks"] * dense["kv_bytes_per_token"] <= 0.00005 * 2**30


def test_kv_capacity_refuses_an_unknown_format(llama_dir):
    import pytest

    with pytest.raises(SystemExit, match="unknown --kv-cache-dtype int3"):
        main(["bench", "kv-capacity", "--model", str(llama_dir), "--kv-cache-dtype", "int3", "--kv-cache-memory", "1"])


def test_kivi_gets_the_ring_slots_its_blocks_can_fill(llama64_dir, tmp_path, capsys):
    from kvflow.bench.kv_capacity import kivi_slots

    out = tmp_path / "cap.json"
    budget = 0.0004  # GiB: a few 76-token sequences
    code = main(["bench", "kv-capacity", "--model", str(llama64_dir), "--dtype", "float32", "--kv-cache-dtype",
                 "float32", "kivi2", "--kv-cache-memory", str(budget), "--num-prompts", "12", "--input-len", "72",
                 "--output-len", "4", "--kv-residual-tokens", "32", "--output", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    results = {r["kv_cache_dtype"]: r for r in saved["results"]}
    dense, kivi = results["float32"], results["kivi2"]
    assert (dense["block_size"], dense["max_num_seqs"], dense["fixed_bytes"]) == (16, 12, 0)
    assert kivi["block_size"] == 32 and kivi["fixed_bytes"] > 0  # the ring, in the budget
    slots = kivi["max_num_seqs"]
    assert slots == kivi_slots(str(llama64_dir), "float32", "kivi2", budget, 76, 32, 32, 12)
    # the most slots whose ring leaves blocks for as many whole sequences: one more would not fit
    assert kivi["fits"] >= slots and (slots == 12 or kivi_slots(str(llama64_dir), "float32", "kivi2", budget, 76,
                                                                32, 32, slots + 1) == slots)
    per_slot = kivi["fixed_bytes"] // slots
    spare = budget * 2**30 - (slots + 1) * per_slot
    assert slots == 12 or spare // (kivi["kv_bytes_per_token"] * 32) // 3 < slots + 1  # 76 tokens: 3 blocks
    assert kivi["num_blocks"] * kivi["kv_bytes_per_token"] * 32 + kivi["fixed_bytes"] <= budget * 2**30
    assert 1 <= kivi["max_running"] <= slots and kivi["fits"] > dense["fits"]
    assert saved["settings"]["kv_residual_tokens"] == 32
    assert "ring slots" in capsys.readouterr().out


def test_count_only_reports_what_fits_without_running(llama64_dir, tmp_path, capsys):
    out = tmp_path / "cap.json"
    assert main(["bench", "kv-capacity", "--model", str(llama64_dir), "--dtype", "float32", "--kv-cache-dtype",
                 "float32", "int8", "kivi4", "--kv-cache-memory", "0.0004", "--num-prompts", "12", "--input-len", "72",
                 "--output-len", "4", "--kv-residual-tokens", "32", "--block-size", "32", "--no-cpu-kernels",
                 "--count-only", "--output", str(out)]) == 0
    assert "not run (--count-only)" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["settings"]["cpu_kernels"] is False and saved["settings"]["count_only"] is True
    for r in saved["results"]:
        assert r["block_size"] == 32 and r["seconds"] == 0 and r["max_running"] == 0 and r["fits"] >= 1
