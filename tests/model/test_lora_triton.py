"""The Triton multi-LoRA kernels (kvflow/model/triton/lora.py) against the per-run torch products in fp64.
Without a GPU they run under Triton's interpreter (fp32), so shapes stay small."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU: its kernels "
                    "cannot run here", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: jit reads it then
pytest.importorskip("triton", reason="the LoRA kernels need Triton (pip install 'kvflow[gpu]')")

from kvflow.model.triton import lora as lora_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("m,k,n,r,runs", [
    (5, 40, 24, 8, [(0, 0, 5)]),                       # one run, shapes off every block
    (37, 64, 72, 24, [(1, 0, 3), (0, 3, 20), (2, 25, 37)]),  # several slots, a gap (base rows), a long run
    (16, 32, 32, 48, [(2, 0, 16)]),                   # a stacked rank above one rank block
])
def test_lora_add_matches_per_run_products(m, k, n, r, runs):
    g = torch.Generator().manual_seed(m * 131 + r)
    slots = 3
    x = torch.randn(m, k, generator=g)
    a = torch.randn(slots, r, k, generator=g) * 0.1
    b = torch.randn(slots, r, n, generator=g) * 0.1
    out = torch.randn(m, n, generator=g)
    expected = out.double().clone()
    for slot, start, end in runs:
        expected[start:end] += x[start:end].double() @ a[slot].double().t() @ b[slot].double()
    got = out.to(DEVICE).clone()
    tiles = lora_triton.run_tiles(runs, DEVICE)
    lora_triton.lora_add(x.to(DEVICE), got, a.to(DEVICE), b.to(DEVICE), tiles)
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-4, rtol=1e-4)
    untouched = torch.ones(m, dtype=torch.bool)
    for _, start, end in runs:
        untouched[start:end] = False
    assert torch.equal(got.cpu()[untouched], out[untouched])  # base rows: the base output, bit for bit


def test_tiles_cut_runs_into_blocks_of_rows():
    tiles = lora_triton.run_tiles([(1, 0, 40), (0, 40, 41)], torch.device("cpu")).tolist()
    assert tiles == [[1, 0, 16], [1, 16, 32], [1, 32, 40], [0, 40, 41]]
