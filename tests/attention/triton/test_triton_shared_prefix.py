"""The Triton decode kernel with shared-prefix groups (triton/decode.py): a group's shared keys read
once for all members' query heads, merged with each member's own splits; against the fp64
reference and the same call without groups. Tiny shapes: under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvflow.attention.kv_quant import quantize_int8  # noqa: E402
from kvflow.attention.shared_prefix import SharedPrefixGroups  # noqa: E402
from kvflow.attention.triton import TritonBackend, decode_attention  # noqa: E402
from kvflow.worker.step_inputs import paged_step_inputs  # noqa: E402
from tests.attention.triton.test_triton_kernels import DTYPES, LSE_TOL, TOL, Paged, reference  # noqa: E402

BS = 4


def _share(paged: Paged, groups: list[tuple[list[int], int]]) -> SharedPrefixGroups:
    """Point each group's members' first blocks at the first member's (as prefix caching does);
    returns the groups as shared_prefix.py describes them."""
    rows, members = [], []
    for group, blocks in groups:
        for m in group[1:]:
            paged.block_tables[m, :blocks] = paged.block_tables[group[0], :blocks]
        rows.append((len(members), len(members) + len(group), blocks))
        members.extend(group)
    device = paged.block_tables.device
    return SharedPrefixGroups(torch.tensor(rows, device=device), torch.tensor(members, device=device),
                              max(len(g) for g, _ in groups), max(p for _, p in groups))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_shared_prefix_groups(device, dtype, num_heads, num_kv_heads, num_splits):
    """Groups of 2 (sharing 3 blocks) and 5 (sharing 6: two 16-key tiles, the second partial), the
    members' own keys from one key (right after the shared run) to several blocks, a decode alone;
    with one or three own splits (a member's own part may leave a split empty)."""
    seq_lens = [13, 30, 44, 25, 26, 27, 60, 9]  # members: 0, 1 | 2, 3, 4, 5, 6; 7 alone
    paged = Paged(seq_lens, BS, num_kv_heads, 16, dtype, device, seed=21)
    shared = _share(paged, [([0, 1], 3), ([2, 3, 4, 5, 6], 6)])
    gen = torch.Generator().manual_seed(22)
    q = (torch.randn(len(seq_lens), num_heads, 16, generator=gen) * 2).to(dtype).to(device)
    args = (q, paged.cache, paged.seq_lens, paged.block_tables, 0.3, None, num_splits)
    out, lse = decode_attention(*args, block_n=16, shared=shared)
    plain, plain_lse = decode_attention(*args, block_n=16)
    for b, n in enumerate(seq_lens):
        ref_out, ref_lse = reference(q[b], paged, b, n - 1, 0.3, None)
        torch.testing.assert_close(out[b].double(), ref_out, **TOL[dtype], msg=f"out seq {b}")
        torch.testing.assert_close(lse[b].double(), ref_lse, **LSE_TOL[dtype], msg=f"lse seq {b}")
    torch.testing.assert_close(out, plain, **TOL[dtype])
    torch.testing.assert_close(lse, plain_lse, **LSE_TOL[dtype])


def test_decode_with_shared_prefix_split_in_the_default_count(device):
    """A shared run of 260 keys (65 blocks) is split in two shared splits (one per 256 keys without a
    GPU), as the members' own keys are by the default split count."""
    seq_lens = [261, 290, 300]
    paged = Paged(seq_lens, BS, 1, 16, torch.float32, device, seed=26)
    shared = _share(paged, [([0, 1, 2], 65)])
    q = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(27)).to(device)
    out, lse = decode_attention(q, paged.cache, paged.seq_lens, paged.block_tables, 0.3, shared=shared)
    for b, n in enumerate(seq_lens):
        ref_out, ref_lse = reference(q[b], paged, b, n - 1, 0.3, None)
        torch.testing.assert_close(out[b].double(), ref_out, **TOL[torch.float32])
        torch.testing.assert_close(lse[b].double(), ref_lse, **LSE_TOL[torch.float32])


def test_decode_with_shared_prefix_over_an_int8_cache(device):
    seq_lens = [21, 33, 17]
    paged = Paged(seq_lens, BS, 1, 16, torch.float32, device, seed=23)
    shared = _share(paged, [([0, 1, 2], 4)])
    codes, scales = quantize_int8(paged.cache.cpu())
    paged.cache = (codes.double() * scales).to(device)
    q = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(24)).to(device)
    out, _ = decode_attention(q, (codes.to(device), scales.to(device)), paged.seq_lens, paged.block_tables, 0.3,
                              num_splits=2, block_n=16, shared=shared)
    for b, n in enumerate(seq_lens):
        torch.testing.assert_close(out[b].double(), reference(q[b], paged, b, n - 1, 0.3, None)[0],
                                   **TOL[torch.float32])


def test_shared_prefix_groups_refuse_a_window(device):
    paged = Paged([9, 9], BS, 1, 16, torch.float32, device, seed=25)
    shared = _share(paged, [([0, 1], 2)])
    q = torch.zeros(2, 1, 16, device=device)
    with pytest.raises(ValueError, match="full attention"):
        decode_attention(q, paged.cache, paged.seq_lens, paged.block_tables, 0.3, 4, shared=shared)


def test_backend_reads_the_step_groups(device):
    """The backend takes the groups paged_step_inputs found (three decodes on the same first blocks, a
    decode alone, a prefill chunk): the same attention as without them."""
    block_ids = [[3, 4, 5, 6], [3, 4, 5, 9], [3, 4, 10], [11, 12], [13, 14, 15]]
    seq_lens, query_lens = [14, 15, 10, 6, 12], [1, 1, 1, 1, 5]
    gen = torch.Generator().manual_seed(28)
    cache = torch.randn(2, 16, 2, BS, 16, generator=gen).to(device)
    q = torch.randn(9, 4, 16, generator=gen).to(device)
    k, v = (torch.randn(9, 2, 16, generator=gen).to(device) for _ in range(2))
    outs = []
    for shared in (True, False):
        _, _, meta, _ = paged_step_inputs(seq_lens, query_lens, block_ids, BS, device, shared_prefix=shared,
                                          shared_prefix_min_saved=0)  # (a GPU's floor would drop these small groups)
        assert (meta.shared_prefix is not None) == shared
        backend = TritonBackend()
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, cache, meta, 0.3))
    assert meta.num_decodes == 4
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float32])
