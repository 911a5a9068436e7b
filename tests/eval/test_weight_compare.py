"""`kvflow eval --compare-weights`: strict entries, a quantised model made once and reused, the table and figure."""

from __future__ import annotations

import json

import pytest

from kvflow.eval.weight_compare import (
    WeightMethod,
    format_weight_comparison,
    parse_weight_methods,
    quantised_model,
    save_weight_comparison,
)

TINY = "kvflow/assets/tiny"


def test_entries_parse_strictly_and_ranges_expand() -> None:
    methods = parse_weight_methods(["dense", "q4_k+awq", "bipolar2..4", "bipolar3+awq"])
    assert [m.name for m in methods] == ["dense", "q4_k+awq", "bipolar2", "bipolar3", "bipolar4", "bipolar3+awq"]
    assert methods[2] == WeightMethod("bipolar", 2, False) and methods[2].params == {"bits": 2}
    assert methods[1].folder == "q4_k-awq"
    for bad, message in (("q3_k", "is not"), ("bipolar9", "2 to 8"), ("bipolar5..3", "2 to 8"),
                         ("dense+awq", "nothing to calibrate"), ("int8,int8", "is not")):
        with pytest.raises(ValueError, match=message):
            parse_weight_methods([bad])
    with pytest.raises(ValueError, match="repeat"):
        parse_weight_methods(["int8", "int8"])


def test_run_time_options_parse_and_become_engine_settings() -> None:
    """+a8 (int8 W8A8) and +head (the LM head quantised at load) ride on a format's checkpoint: they share
    its folder, and add the engine settings that make them (checked by building the engine's config)."""
    from kvflow.config import EngineConfig

    methods = parse_weight_methods(["int8", "int8+a8", "int8+head+a8", "q8_0+head", "bipolar3+head"])
    assert [m.name for m in methods] == ["int8", "int8+a8", "int8+a8+head", "q8_0+head", "bipolar3+head"]
    assert {m.checkpoint_folder for m in methods[:3]} == {"int8"} and methods[2].folder == "int8-a8-head"
    assert methods[0].engine_overrides() == {}
    assert methods[1].engine_overrides() == {"quantization": "int8", "quantization_bits": None,
                                             "quantization_activation_bits": 8}
    assert methods[4].engine_overrides() == {"quantization": "bipolar", "quantization_bits": 3,
                                             "quantization_lm_head": True}
    head = EngineConfig.create(TINY, dtype="float32", **methods[2].engine_overrides()).model.quantization
    assert head.lm_head and head.on_load and head.activation_bits == 8
    for bad, message in (("q8_0+a8", "for int8 weights"), ("q4_k+awq+head", "does not take"),
                         ("int8+a8+a8", "repeats"), ("dense+head", "nothing to"), ("int8+fast", "is not")):
        with pytest.raises(ValueError, match=message):
            parse_weight_methods([bad])


def test_quantised_model_is_made_once_and_reused(tmp_path) -> None:
    calls = []
    folder = tmp_path / "models" / "q8_0"
    path, report = quantised_model(TINY, WeightMethod("q8_0"), folder, lambda: calls.append(1))
    assert path == str(folder) and report["format"] == "q8_0" and report["bits_per_weight"] == pytest.approx(8.5)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again, _ = quantised_model(TINY, WeightMethod("q8_0"), folder, lambda: calls.append(1))
    assert again == path and (folder / "model.safetensors").stat().st_mtime_ns == stamp and not calls
    report_file = folder / "quantize_report.json"  # a checkpoint whose head is quantised is not reused
    report_file.write_text(json.dumps({**json.loads(report_file.read_text()), "lm_head": "quantised"}))
    quantised_model(TINY, WeightMethod("q8_0"), folder, lambda: calls.append(1))
    assert (folder / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads(report_file.read_text())["lm_head"] == "dense"
    assert quantised_model(TINY, WeightMethod(), tmp_path / "d", lambda: None) == (TINY, {})


def test_table_and_figure(tmp_path) -> None:
    rows = [
        {"method": "dense", "format": "dense", "bits": None, "awq": False, "bits_per_weight": 32,
         "model_bits_per_weight": 32, "weight_error": 0.0, "fallbacks": [], "perplexity": 10.0, "passkey": 1.0,
         "multikey": 0.5},
        *({"method": f"bipolar{n}{'+awq' if awq else ''}", "format": "bipolar", "bits": n, "awq": awq,
           "bits_per_weight": n + 1.0, "model_bits_per_weight": 12.0, "weight_error": 0.5 / n, "fallbacks": [],
           "perplexity": 10.0 + 8 / n - awq, "passkey": 0.5, "multikey": None}
          for n in (2, 4) for awq in (False, True)),
        {"method": "q4_k", "format": "q4_k", "bits": None, "awq": False, "bits_per_weight": 4.5,
         "model_bits_per_weight": 11.7, "weight_error": 0.07, "fallbacks": ["q4_0"], "perplexity": 10.3,
         "passkey": 1.0, "multikey": 0.5},
    ]
    table = format_weight_comparison(rows)
    assert "+3.00%" in table and "q4_0" in table and "bipolar2+awq" in table
    json_path, png_path = save_weight_comparison(rows, tmp_path, "tiny")
    assert json.loads(json_path.read_text()) == rows and png_path.stat().st_size > 10_000
