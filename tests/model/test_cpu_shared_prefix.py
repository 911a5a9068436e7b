"""The C++ paged_attention with shared-prefix groups (cpu_attention.h): decodes that share leading
blocks read them once per group; the result is the same attention, against an fp64 reference and
against the same call without groups."""

from __future__ import annotations

import pytest
import torch

from kvflow.model import cpu_kernels
from tests.model.test_cpu_kernels import _TIGHT, BF16_ULP, _naive_paged_attention, _one_thread

ext = cpu_kernels.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="no C++ compiler: the engine runs the PyTorch modules")
BS = 16


def _shared_batch(groups: list[tuple[int, list[int]]], alone: list[int], prefill: int, kv_heads: int, dim: int,
                  dtype: torch.dtype):
    """Decodes in groups (shared blocks P, each member's own keys after them), decodes alone (their
    lengths), then a prefill chunk of `prefill` queries: a cache, tables whose members start with their
    group's physical blocks, seq_index, positions, and the groups' tensors."""
    lengths = [p * BS + own for p, owns in groups for own in owns] + alone + [prefill + 40]
    shared_total = sum(p for p, _ in groups)
    own_blocks = [-(-n // BS) for n in lengths]
    num_blocks = shared_total + sum(own_blocks) + 2
    order = torch.randperm(num_blocks).tolist()
    take = iter(order)
    rows, members, tables = [], [], []
    for p, owns in groups:
        prefix = [next(take) for _ in range(p)]
        rows.append((len(members), len(members) + len(owns), p))
        for own in owns:
            members.append(len(tables))
            tables.append(prefix + [next(take) for _ in range(-(-own // BS))])
    for n in alone + [prefill + 40]:
        tables.append([next(take) for _ in range(-(-n // BS))])
    width = max(len(t) for t in tables)
    tables_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    decodes = len(lengths) - 1
    positions = [n - 1 for n in lengths[:decodes]] + list(range(40, 40 + prefill))
    seq_index = list(range(decodes)) + [decodes] * prefill
    cache = torch.randn(2, num_blocks, kv_heads, BS, dim).to(dtype)
    return (cache, tables_t, torch.tensor(seq_index), torch.tensor(positions),
            torch.tensor(rows, dtype=torch.long), torch.tensor(members, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3])
def test_shared_prefix_matches_fp64_and_the_unshared_call(dtype, dim, group):
    """Groups of 2, 5 and 8 members sharing 3, 9 and 20 blocks; members' own keys from one (the query
    alone, right after the shared run) to several blocks, ending mid-block; two decodes alone and a
    prefill chunk beside them. Sharp scores (q x 3) make each part's maximum matter. Unsplit, and in
    forced 40-key chunks (the shared run and the members' own keys split mid-block, merged by
    log-sum-exp); the same on one thread as on all."""
    torch.manual_seed(11)
    kv_heads = 2
    groups = [(3, [1, 17]), (9, [5, 90, 16, 33, 2]), (20, [1, 130, 7, 64, 3, 48, 200, 16])]
    cache, tables, seq, pos, rows, members = _shared_batch(groups, [100, 300], 5, kv_heads, dim, dtype)
    q = (torch.randn(len(pos), kv_heads * group, dim) * 3).to(dtype)
    args = (q, cache, tables, seq, pos, dim**-0.5, 0)
    expected = _naive_paged_attention(*args)
    rtol, atol = _TIGHT[dtype]
    for chunk in (1 << 20, 40):
        plain = ext.paged_attention(*args, decode_chunk=chunk)
        shared = ext.paged_attention(*args, decode_chunk=chunk, shared_groups=rows, shared_members=members)
        torch.testing.assert_close(shared.double(), expected, rtol=rtol, atol=atol)
        tol = 1e-5 if dtype == torch.float32 else BF16_ULP  # the unshared call: to fp32 summation order
        torch.testing.assert_close(shared.float(), plain.float(), rtol=tol, atol=tol)
        one = _one_thread(ext.paged_attention, *args, decode_chunk=chunk, shared_groups=rows, shared_members=members)
        assert torch.equal(one, shared)


def test_shared_prefix_over_an_int8_cache():
    """The int8 cache's codes and scales take the same shared-prefix items."""
    from kvflow.attention.kv_quant import quantize_int8

    torch.manual_seed(12)
    cache, tables, seq, pos, rows, members = _shared_batch([(6, [3, 50, 20])], [70], 3, 2, 64, torch.float32)
    codes, scales = quantize_int8(cache * 3)
    q = torch.randn(len(pos), 6, 64)
    args = (q, codes, tables, seq, pos, 0.125, 0)
    expected = _naive_paged_attention(q, codes.double() * scales.double(), *args[2:])
    out = ext.paged_attention(*args, kv_scales=scales, shared_groups=rows, shared_members=members)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ext.paged_attention(*args, kv_scales=scales), rtol=1e-5, atol=1e-5)


def test_empty_groups_are_the_plain_call():
    torch.manual_seed(13)
    cache, tables, seq, pos, _, _ = _shared_batch([(2, [5, 9])], [], 2, 1, 64, torch.float32)
    q = torch.randn(len(pos), 2, 64)
    args = (q, cache, tables, seq, pos, 0.125, 0)
    empty = torch.empty(0, 3, dtype=torch.long)
    out = ext.paged_attention(*args, shared_groups=empty, shared_members=torch.empty(0, dtype=torch.long))
    assert torch.equal(out, ext.paged_attention(*args))


def test_invalid_groups_are_refused():
    """A member whose position lies inside the shared run, a prefill token as a member, a member in two
    groups, a window: refused rather than computed wrongly."""
    torch.manual_seed(14)
    cache, tables, seq, pos, rows, members = _shared_batch([(3, [1, 20])], [], 4, 1, 64, torch.float32)
    q = torch.randn(len(pos), 2, 64)
    args = (q, cache, tables, seq, pos, 0.125)

    def call(r, m, window=0):
        return ext.paged_attention(*args, window, shared_groups=r, shared_members=m)

    with pytest.raises(RuntimeError, match="after the shared blocks"):
        call(torch.tensor([[0, 2, 4]]), members)
    with pytest.raises(RuntimeError, match="decode token"):
        call(torch.tensor([[0, 2, 1]]), torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="one group"):
        call(torch.tensor([[0, 2, 1], [2, 4, 1]]), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(RuntimeError, match="full attention"):
        call(rows, members, window=8)
