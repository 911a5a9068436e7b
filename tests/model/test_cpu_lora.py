"""`add_lora` (kvflow/csrc/cpu_lora.h), the C++ forward's multi-LoRA delta, against per-run fp64 products:
block-diagonal B of stacked shards (qkv, gate_up), K and N off the vector width, runs of 1 to 8 rows, runs
cut into pieces, prefill-sized runs through ATen's GEMMs, base rows untouched, each dtype."""

from __future__ import annotations

import pytest
import torch

from kvflow.model.cpu_kernels import load_extension

ext = load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="needs the C++ CPU kernels")


def _slots(g: torch.Generator, slots: int, rank: int, k: int, cols: list[int], dtype: torch.dtype):
    """A [S, W, K] and B [S, W, N] as LoRASlots holds them: shard j's ranks write only its own columns."""
    shards, n = len(cols) - 1, cols[-1]
    a = torch.randn(slots, shards * rank, k, generator=g) * 0.1
    b = torch.zeros(slots, shards * rank, n)
    for j in range(shards):
        b[:, j * rank:(j + 1) * rank, cols[j]:cols[j + 1]] = torch.randn(slots, rank, cols[j + 1] - cols[j],
                                                                          generator=g) * 0.1
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("k,cols,rank", [
    (64, [0, 64, 80, 96], 8),      # qkv-like: three shards
    (40, [0, 24, 48], 4),          # gate_up-like, K and shards off the vector width
    (37, [0, 131], 16),            # one shard, every tail
])
def test_matches_per_run_products(dtype, tol, k, cols, rank):
    g = torch.Generator().manual_seed(k * 7 + rank)
    slots, n = 4, cols[-1]
    long = ext.lora_fused_max_rows + 5
    # runs of 1..8 rows, one cut into pieces (11 rows), a prefill-sized one (ATen), base rows between
    runs = [(2, 0, 1), (0, 1, 9), (3, 11, 22), (1, 22, 25), (2, 30, 30 + long)]
    t = 30 + long + 2
    x = torch.randn(t, k, generator=g).to(dtype)
    a, b = _slots(g, slots, rank, k, cols, dtype)
    out = torch.randn(t, n, generator=g).to(dtype)
    got = out.clone()
    ext.add_lora(got, x, a, b, torch.tensor(runs, dtype=torch.long), cols)
    expected = out.double().clone()
    for slot, start, end in runs:
        expected[start:end] += x[start:end].double() @ a[slot].double().t() @ b[slot].double()
    torch.testing.assert_close(got.double(), expected, atol=tol * 4, rtol=tol)
    untouched = torch.ones(t, dtype=torch.bool)
    for _, start, end in runs:
        untouched[start:end] = False
    assert torch.equal(got[untouched], out[untouched])  # base rows: the base output, bit for bit


def test_fused_rows_do_not_depend_on_their_neighbours():
    """A decode row's delta is the same whether its run has 1 or 8 rows (pieces never mix rows)."""
    g = torch.Generator().manual_seed(3)
    k, cols, rank = 96, [0, 48, 96], 8
    a, b = _slots(g, 2, rank, k, cols, torch.bfloat16)
    x = torch.randn(8, k, generator=g).to(torch.bfloat16)
    out = torch.randn(8, 96, generator=g).to(torch.bfloat16)
    together = out.clone()
    ext.add_lora(together, x, a, b, torch.tensor([(1, 0, 8)]), cols)
    for row in range(8):
        alone = out[row:row + 1].clone()
        ext.add_lora(alone, x[row:row + 1], a, b, torch.tensor([(1, 0, 1)]), cols)
        assert torch.equal(together[row], alone[0])


def test_refuses_shards_that_do_not_cover_the_output():
    a, b = torch.zeros(1, 8, 16), torch.zeros(1, 8, 32)
    with pytest.raises(RuntimeError, match="shard columns"):
        ext.add_lora(torch.zeros(2, 32), torch.zeros(2, 16), a, b, torch.tensor([(0, 0, 2)]), [0, 16])
    with pytest.raises(RuntimeError, match="multiple of the shards"):
        ext.add_lora(torch.zeros(2, 32), torch.zeros(2, 16), a, b, torch.tensor([(0, 0, 2)]), [0, 10, 20, 32])


def test_a_nan_stays_a_nan_in_bf16():
    """The kernel's own bf16 rounding keeps NaN a NaN (adding the rounding bias must not make it infinite)."""
    a, b = torch.ones(1, 8, 16, dtype=torch.bfloat16), torch.ones(1, 8, 32, dtype=torch.bfloat16)
    out = torch.zeros(2, 32, dtype=torch.bfloat16)
    x = torch.ones(2, 16, dtype=torch.bfloat16)
    x[1, 3] = float("nan")
    ext.add_lora(out, x, a, b, torch.tensor([(0, 0, 2)]), [0, 32])
    assert torch.equal(out[0], torch.full((32,), 128.0, dtype=torch.bfloat16))  # 16 · 8, exact
    assert out[1].isnan().all()
