"""`kvflow bench bitplane` on a tiny matrix under Triton's interpreter: every impl reported, its
error against the torch reference small, the JSON written; the CLI refuses a CPU without it."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU: its kernels "
                    "cannot run here", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: jit reads it then
pytest.importorskip("triton", reason="the bit-plane kernels need Triton (pip install 'kvflow[gpu]')")

from kvflow.bench import bitplane  # noqa: E402
from kvflow.cli import main  # noqa: E402


def test_bench_reports_every_impl_against_the_dense_product(tmp_path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter has no bf16 tl.dot
    results = bitplane.run({"o": (40, 64)}, (3,), (2,), 32, bitplane.IMPLS, device, dtype, repeats=1, stream_mib=0)
    assert [r.impl for r in results] == list(bitplane.IMPLS)
    for r in results:
        assert (r.matrix, r.n, r.k, r.bits, r.rows) == ("o", 40, 64, 3, 2) and r.us > 0 and r.us_eager > 0
        assert (r.vs_torch is None) == (r.impl == "torch") == (r.rel_err is None)
    assert not bitplane.inaccurate(results)
    table = bitplane.format_results(results)
    assert "triton-planewise" in table and "40x64" in table
    path = tmp_path / "bitplane.json"
    bitplane.save_results(results, path, device, "test", 32, dtype)
    payload = json.loads(path.read_text())
    assert payload["kind"] == "bitplane" and len(payload["results"]) == len(bitplane.IMPLS)


def test_inaccurate_flags_errors_over_the_bound():
    row = bitplane.BitplaneResult("o", 8, 32, 2, 1, "triton", 1.0, 1.0, 1.0, 1.0, 1.0, 0.5)
    assert bitplane.inaccurate([row]) == [row]
    row.rel_err = float("nan")
    assert bitplane.inaccurate([row]) == [row]
    row.rel_err = 1e-3
    assert bitplane.inaccurate([row]) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cli_refuses_a_cpu_without_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["bench", "bitplane", "--device", "cpu"]) == 2
    assert "need a CUDA device" in capsys.readouterr().out
