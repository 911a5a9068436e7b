"""`kvflow bench throughput-plot`: one bar per backend and workload, from saved reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.cli import main as cli_main


def _report(path: Path, runs: list[tuple[str, str, float]]) -> Path:
    path.write_text(json.dumps({"kind": "throughput", "model": "models/135m", "runs": [
        {"backend": b, "workload": w, "output_tok_s": v, "input_len": 128, "output_len": 128, "num_prompts": 64}
        for b, w, v in runs]}))
    return path


def test_plot_writes_png_with_later_reports_winning(tmp_path: Path, monkeypatch):
    import matplotlib.axes

    bars: list[tuple[list[str], list[float]]] = []
    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, **kw: bars.append((list(x), list(h))) or real_bar(self, x, h, **kw))
    first = _report(tmp_path / "a.json", [("kvflow", "offline", 300.0), ("vllm", "offline", 270.0),
                                          ("kvflow", "single", 30.0)])
    later = _report(tmp_path / "b.json", [("kvflow", "offline", 357.0)])
    out = tmp_path / "fig.png"
    assert cli_main(["bench", "throughput-plot", str(first), str(later), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bars == [(["kvflow", "vllm"], [357.0, 270.0]), (["kvflow"], [30.0])]


def test_plot_rejects_other_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    other = tmp_path / "serve.json"
    other.write_text(json.dumps({"kind": "serve", "runs": []}))
    # The CLI turns the ValueError into a message and exit status 2.
    assert cli_main(["bench", "throughput-plot", str(other), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a `kvflow bench throughput` report" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
