"""The Triton KIVI kernels (kvflow/attention/triton/kivi.py) against an fp64 reference written here
over the dequantised cache (`kivi.dequantize_blocks` for positions below Q, the ring above it, the
chunk's own k, v), and against the torch reference `kivi.kivi_attention`: decodes and prefill
chunks, kivi4 and kivi2, head_dim 64 and 128, GQA, chunks starting mid-group, prefix floors, sliding
windows. Every slot of the cache and ring (also those no query may read) holds random data, so a
wrong read shows."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvflow.attention import kivi  # noqa: E402
from kvflow.attention.triton.kivi import (  # noqa: E402
    kivi_attention,
    kivi_decode_attention,
    kivi_prefill_attention,
    unpack_codes,
)

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}
LSE_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=2e-4, rtol=1e-4)}


class KiviCase:
    """A random KIVI cache and one step: per sequence (chunk start, chunk length, prefix floor H),
    decodes first, each with its own ring slot and scattered blocks."""

    def __init__(self, seqs: list[tuple[int, int, int]], bits: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, seed: int, block_size: int = 32, residual: int = 32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.seqs, self.bits, self.block_size, self.residual = seqs, bits, block_size, residual
        self.num_decodes = sum(1 for _, n, _ in seqs if n == 1)
        assert all(n == 1 for _, n, _ in seqs[:self.num_decodes])
        seq_lens = [s + n for s, n, _ in seqs]
        nblocks = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(nblocks) + 2
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        tables, used = [], 0
        for n in nblocks:
            tables.append(perm[used:used + n] + [0] * (max(nblocks) + 1 - n))  # padded with 0
            used += n
        self.tables_list = tables
        kvh, d = num_kv_heads, head_dim
        levels = (1 << bits) - 1
        codes = torch.randint(0, 256, (2, num_blocks, kvh, block_size, d * bits // 8), generator=gen, dtype=torch.uint8)
        meta = torch.randn(2, num_blocks, kvh, block_size, d // 16, generator=gen) * (1.0 / levels)
        num_slots = len(seqs) + 1
        window = residual + kivi.KIVI_GROUP
        ring = torch.randn(2, num_slots, kvh, window, d, generator=gen).to(dtype)
        self.cache = (codes.to(device), meta.half().to(device), ring.to(device))
        slots = torch.randperm(num_slots, generator=gen)[:len(seqs)].tolist()
        lens = [n for _, n, _ in seqs]
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        self.query_start = qsl
        self.q = torch.randn(qsl[-1], num_heads, d, generator=gen).to(dtype).to(device)
        self.k = torch.randn(qsl[-1], kvh, d, generator=gen).to(dtype).to(device)
        self.v = torch.randn(qsl[-1], kvh, d, generator=gen).to(dtype).to(device)
        self.step = kivi.KiviStep.build(bits, residual, block_size, slots, [s for s, _, _ in seqs], seq_lens,
                                        [f for _, _, f in seqs], qsl, tables, device)
        self.block_tables = torch.tensor(tables, dtype=torch.long, device=device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
        self.query_lens = lens
        self.qsl = torch.tensor(qsl, dtype=torch.long, device=device)
        self.scale = 1.0 / math.sqrt(d)
        for (start, _, floor), q_before in zip(seqs, self.step.quantised_list):
            assert q_before <= start and q_before % kivi.KIVI_GROUP == 0 and q_before >= floor

    def context(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp64 keys, values [start + n, KVH, D] of sequence b's positions as the step's attention reads them."""
        codes, meta, ring = self.cache
        start, n, _ = self.seqs[b]
        q_before = self.step.quantised_list[b]
        blocks = torch.tensor(self.tables_list[b], device=codes.device)[:-(-q_before // self.block_size) or 0]
        slot = int(self.step.slots[b])
        window = ring.shape[3]
        out = []
        for half, own in ((0, self.k), (1, self.v)):
            deq = kivi.dequantize_blocks(codes[half][blocks], meta[half][blocks], self.bits, half, torch.float64)
            deq = deq.transpose(1, 2).reshape(-1, deq.shape[1], deq.shape[3])[:q_before]  # [Q, KVH, D]
            ring_rows = ring[half][slot][:, [p % window for p in range(q_before, start)]].transpose(0, 1).double()
            rows = own[self.query_start[b]:self.query_start[b] + n].double()
            out.append(torch.cat([deq, ring_rows, rows]))
        return out[0], out[1]

    def reference(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp64 (out [T, H, D], lse [T, H]) of every query."""
        outs, lses = [], []
        for b, (start, n, _) in enumerate(self.seqs):
            keys, values = self.context(b)
            num_heads, kvh = self.q.shape[1], keys.shape[1]
            kv_idx = torch.arange(num_heads) // (num_heads // kvh)
            for i in range(n):
                pos = start + i
                lo = max(0, pos - window + 1) if window is not None else 0
                k, v = keys[lo:pos + 1], values[lo:pos + 1]
                scores = torch.einsum("hd,nhd->hn", self.q[self.query_start[b] + i].double(), k[:, kv_idx]) * self.scale
                outs.append(torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), v[:, kv_idx]))
                lses.append(torch.logsumexp(scores, -1))
        return torch.stack(outs), torch.stack(lses)


# Chunks (start, length, prefix floor H) with R = 32 (W = 64) and 32-token blocks: decodes before any
# group is quantised, with Q inside a block and at a block edge; prefill chunks fresh, starting
# mid-group, after a prefix hit (floor 64 above the formula's Q) and long enough to cross tiles.
DECODES = [(0, 1, 0), (40, 1, 0), (70, 1, 0), (97, 1, 0), (130, 1, 64)]
PREFILLS = [(0, 40, 0), (45, 20, 0), (64, 33, 64), (100, 7, 0), (140, 1 + 2, 128)]


@pytest.mark.parametrize(
    "bits,head_dim,num_heads,num_kv_heads,window,num_splits,dtype,block_size",
    [
        (4, 64, 4, 2, None, 1, torch.float32, 32),
        (2, 64, 8, 2, None, 3, torch.float32, 64),
        (4, 128, 4, 4, 50, 2, torch.float16, 32),
        (2, 128, 4, 1, None, None, torch.float16, 32),
        (4, 32, 8, 2, 20, 3, torch.float32, 64),
    ],
)
def test_kivi_decode(device, bits, head_dim, num_heads, num_kv_heads, window, num_splits, dtype, block_size):
    """Decodes (ring only, blocks and ring, a prefix floor), split and not; two key groups per block
    with 64-token blocks."""
    case = KiviCase(DECODES, bits, num_heads, num_kv_heads, head_dim, dtype, device, seed=bits * head_dim + num_heads,
                    block_size=block_size)
    nd = case.num_decodes
    out, lse = kivi_decode_attention(case.q, case.k, case.v, case.cache, bits, case.seq_lens, case.step.quantised,
                                     case.step.slots, case.block_tables, case.scale, window, num_splits, block_n=16)
    ref_out, ref_lse = case.reference(window)
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[dtype])
    expected = kivi.kivi_attention(case.q, case.k, case.v, case.cache, case.step, case.block_tables,
                                   case.query_lens, case.query_start[:-1], case.scale, window)
    torch.testing.assert_close(out[:nd], expected, **TOL[dtype])


@pytest.mark.parametrize(
    "bits,head_dim,num_heads,num_kv_heads,window,block_mn,dtype",
    [
        (4, 64, 4, 2, None, 16, torch.float32),
        (2, 64, 4, 4, 37, 16, torch.float32),
        (4, 128, 8, 2, None, 16, torch.float16),
        (2, 128, 4, 1, 20, None, torch.float16),
    ],
)
def test_kivi_prefill(device, bits, head_dim, num_heads, num_kv_heads, window, block_mn, dtype):
    case = KiviCase(DECODES[:2] + PREFILLS, bits, num_heads, num_kv_heads, head_dim, dtype, device,
                    seed=bits * head_dim + num_heads + 1)
    nd = case.num_decodes
    out = torch.full_like(case.q, 7.0)
    lse = torch.full(case.q.shape[:2], 7.0, device=device)
    kivi_prefill_attention(case.q, case.k, case.v, case.cache, bits, case.qsl, case.seq_lens, case.step.quantised,
                           case.step.slots, case.block_tables, case.scale, window, first_seq=nd, out=out, lse=lse,
                           block_m=block_mn, block_n=block_mn)
    assert (out[:nd] == 7.0).all() and (lse[:nd] == 7.0).all()  # decode rows untouched
    ref_out, ref_lse = case.reference(window)
    torch.testing.assert_close(out[nd:].double(), ref_out[nd:], **TOL[dtype])
    torch.testing.assert_close(lse[nd:].double(), ref_lse[nd:], **LSE_TOL[dtype])


@pytest.mark.parametrize("bits,window", [(4, None), (2, 45)])
def test_kivi_step_matches_the_torch_reference(device, bits, window):
    """Decodes and prefill chunks of one step through `kivi_attention` (both kernels), against
    `kivi.kivi_attention`; a ring of R = 0 (W = 32) and 64-token blocks."""
    seqs = [(5, 1, 0), (100, 1, 64), (0, 50, 0), (70, 30, 64), (130, 4, 128)]
    case = KiviCase(seqs, bits, 4, 2, 64, torch.float32, device, seed=bits, block_size=64, residual=0)
    out = kivi_attention(case.q, case.k, case.v, case.cache, case.step, case.seq_lens, case.qsl, case.block_tables,
                         case.num_decodes, max(case.query_lens), case.scale, window)
    expected = kivi.kivi_attention(case.q, case.k, case.v, case.cache, case.step, case.block_tables,
                                   case.query_lens, case.query_start[:-1], case.scale, window)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(out.double(), case.reference(window)[0], **TOL[torch.float32])


@triton.jit
def _unpack(src, dst, BITS: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    rows = tl.arange(0, N)
    packed = tl.load(src + rows[:, None] * (D * BITS // 8) + tl.arange(0, D * BITS // 8)[None, :])
    tl.store(dst + rows[:, None] * D + tl.arange(0, D)[None, :], unpack_codes(packed, BITS, N, D))


@pytest.mark.parametrize("bits", [4, 2])
def test_unpacked_codes_match_the_reference(device, bits):
    """Every byte value unpacks into the channels kivi.unpack_codes gives."""
    d = 64
    packed = torch.arange(256, dtype=torch.uint8).view(-1, d * bits // 8).to(device)
    out = torch.empty(packed.shape[0], d, dtype=torch.int32, device=device)
    _unpack[(1,)](packed, out, BITS=bits, N=packed.shape[0], D=d)
    assert torch.equal(out.long().cpu(), kivi.unpack_codes(packed.cpu(), bits).long())


@pytest.mark.parametrize("fmt", ["kivi4", "kivi2"])
def test_bench_triton_kivi_matches_its_reference(device, fmt):
    """`kvflow bench attention`'s triton-kivi4 / -kivi2 (what .ci/gpu times) on a small decode case,
    through run_case: checked against naive over the context as KIVI holds it (blocks dequantised
    below Q = 96, the ring above), with the default split count and tiles."""
    from kvflow.bench.attention import AttentionCase, _naive, _triton_kivi, run_case

    case = AttentionCase("decode", 2, 230, 8, 2, 64, 32, torch.float32, device)
    impls = {f"triton-{fmt}": _triton_kivi(fmt), "naive": _naive}
    (result,) = [r for r in run_case(case, impls, repeats=1, naive_max_len=512) if r.implementation != "naive"]
    assert case.kivi_state(fmt).step.quantised_list == [96, 96]
    assert result.reference == "naive" and result.max_abs_err < 1e-4, result
