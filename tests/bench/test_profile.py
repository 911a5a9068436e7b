"""`kvflow bench profile`: decode-only op shares that add up, from the CLI to its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.bench.profile import profile_decode
from kvflow.cli import main as cli_main


def test_profile_reports_decode_ops(llama_dir: Path):
    # 12 decode steps: the decode's share must outweigh the run-to-run noise of the prefill run the
    # profile subtracts (with 4, a loaded machine could make the matmuls' difference negative).
    report = profile_decode(llama_dir, "offline", num_prompts=3, input_len=12, decode_steps=12, dtype="float32")
    assert report.batch == 3 and report.decode_steps == 12
    assert report.ms_per_step > 0 and report.ops_per_step > 50
    names = [op.name for op in report.top_ops]
    # fp32 decode steps: the C++ forward's fp32 GEMV where the build has it, else plain torch linears.
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    if ext is not None and ext.small_rows_f32:
        assert "kvflow::linear_f32" in names
    else:
        assert "aten::addmm" in names or "aten::mm" in names
    assert 0 < report.matmul_ms_per_step <= report.profiled_ms_per_step
    assert sum(op.self_ms for op in report.top_ops) <= report.profiled_ms_per_step + 1e-6
    with pytest.raises(ValueError, match="workload"):
        profile_decode(llama_dir, "serving")


def test_profile_cli_saves_json(llama_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "p.json"
    assert cli_main(["bench", "profile", "--model", str(llama_dir), "--workload", "single", "--steps", "3",
                       "--input-len", "8", "--dtype", "bfloat16", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["workload"] == "single" and saved["batch"] == 1
    # bf16 decode steps: the C++ forward's own GEMV where the build has it, else oneDNN's prepacked linear.
    from kvflow.model.cpu_kernels import decode_gemv_available

    linear = "kvflow::decode_linear" if decode_gemv_available() else "mkldnn::_linear_pointwise"
    assert any(op["name"] == linear for op in saved["top_ops"])
    assert "ATen calls/step" in capsys.readouterr().out


def test_profile_cli_passes_the_engine_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Every engine flag reaches the profiled engine (and nothing else does: unset flags keep the config's
    defaults)."""
    import kvflow.bench.profile as profile

    seen: dict = {}

    def fake_profile(model, workload, **kwargs):
        seen.update(kwargs["engine_kwargs"])
        raise SystemExit(0)  # stop before any engine is built

    monkeypatch.setattr(profile, "profile_decode", fake_profile)
    with pytest.raises(SystemExit) as stop:  # an unknown flag would be argparse's exit 2
        cli_main(["bench", "profile", "--model", str(tmp_path), "--quantization", "int8",
                  "--quantization-activation-bits", "8", "--no-cpu-kernels", "--kv-cache-memory", "0.5"])
    assert stop.value.code == 0
    assert seen == {"quantization": "int8", "quantization_activation_bits": 8, "cpu_kernels": False,
                    "kv_cache_memory": 0.5}
