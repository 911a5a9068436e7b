"""The Triton kernels (store_kv, varlen paged prefill, flash-decoding) against a naive fp64
reference written here, independent of any backend: gather each sequence's keys through its block
table, mask causally (and by sliding window), softmax(QK^T * scale) V, and logsumexp. With an int8
cache the store must reproduce kv_quant.quantize_int8 bit for bit, and attention the reference over
the dequantised cache."""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from kvflow.attention.kv_quant import quantize_int8  # noqa: E402
from kvflow.attention.triton import decode_attention, prefill_attention, store_kv  # noqa: E402
from tests.attention.int8_rows import int8_test_rows  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LSE_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=2e-4, rtol=1e-4),
           torch.bfloat16: dict(atol=2e-3, rtol=1e-3)}
# The interpreter computes bf16 wrongly, so bf16 is tested only where the kernels are compiled.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
GQA = [(4, 4), (4, 2), (8, 2), (4, 1)]  # (num_heads, num_kv_heads): ratios 1, 2, 4 and MQA


class Paged:
    """A random paged KV cache holding sequences of given lengths in scattered blocks."""

    def __init__(self, seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, seed: int, spare_blocks: int = 3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        nblocks = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(nblocks) + spare_blocks
        perm = torch.randperm(num_blocks, generator=gen)
        self.block_tables = torch.zeros(len(seq_lens), max(nblocks) + 1, dtype=torch.int64)  # padded with 0
        used = 0
        for b, n in enumerate(nblocks):
            self.block_tables[b, :n] = perm[used:used + n]
            used += n
        # Every slot (also unused and padding ones) holds random data, so a wrong read shows.
        self.cache = torch.randn(2, num_blocks, num_kv_heads, block_size, head_dim, generator=gen).to(dtype)
        self.cache = self.cache.to(device)
        self.block_tables = self.block_tables.to(device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)

    def kv(self, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, n) of sequence b, as fp64 [n, kv_heads, head_dim]."""
        pos = torch.arange(n, device=self.cache.device)
        blocks = self.block_tables[b][pos // self.block_size]
        off = pos % self.block_size
        return self.cache[0][blocks, :, off].double(), self.cache[1][blocks, :, off].double()


def reference(q: torch.Tensor, paged: Paged, b: int, pos: int, scale: float,
              window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive attention of one query token q [H, D] at position `pos` of sequence b: (out, lse)."""
    keys, values = paged.kv(b, pos + 1)
    lo = max(0, pos - window + 1) if window is not None else 0
    keys, values = keys[lo:], values[lo:]
    num_heads, num_kv_heads = q.shape[0], keys.shape[1]
    kv_idx = torch.arange(num_heads) // (num_heads // num_kv_heads)
    scores = torch.einsum("hd,nhd->hn", q.double(), keys[:, kv_idx]) * scale  # [H, n]
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hn,nhd->hd", probs, values[:, kv_idx]), torch.logsumexp(scores, dim=-1)


# ---------------------------------------------------------------------------------- store_kv
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 16), (3, 24)])
def test_store_kv(device, dtype, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(7)
    num_blocks, block_size, num_tokens = 5, 4, 9
    cache = torch.randn(2, num_blocks, num_kv_heads, block_size, head_dim, generator=gen).to(dtype).to(device)
    before = cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # padding token: must not be written anywhere
    slots = slots.to(device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    store_kv(k, v, cache, slots)
    expected = before.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[0, slot // block_size, :, slot % block_size] = k[t]
            expected[1, slot // block_size, :, slot % block_size] = v[t]
    assert torch.equal(cache, expected)
    written = (slots >= 0).sum().item()
    assert (cache != before).any(dim=(0, 2, 4)).sum().item() == written  # nothing else changed


# ---------------------------------------------------------------------------------- prefill
def _run_prefill(device, dtype, num_heads, num_kv_heads, window, seed, head_dim=16, block_size=4,
                 chunks=((0, 1), (0, 13), (9, 7), (21, 19)), num_decodes=2, int8=False, **kw):
    """chunks: (cached prefix, new tokens) per prefill sequence, after `num_decodes` decodes."""
    rng = random.Random(seed)
    decodes = [(rng.randint(0, 12), 1) for _ in range(num_decodes)]
    seqs = decodes + list(chunks)
    seq_lens = [p + n for p, n in seqs]
    paged = Paged(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, seed)
    cache = quantize_paged(paged, seed) if int8 else paged.cache
    qsl = torch.tensor([0] + [n for _, n in seqs], device=device).cumsum(0)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, 7.0)
    lse = torch.full((q.shape[0], num_heads), 7.0, device=device)
    prefill_attention(q, cache, qsl, paged.seq_lens, paged.block_tables, scale, window,
                      first_seq=num_decodes, out=out, lse=lse, **kw)
    nd_tokens = int(qsl[num_decodes])
    assert (out[:nd_tokens] == 7.0).all() and (lse[:nd_tokens] == 7.0).all()  # decode rows untouched
    for b in range(num_decodes, len(seqs)):
        prefix, n = seqs[b]
        for i in range(n):
            t = int(qsl[b]) + i
            ref_out, ref_lse = reference(q[t], paged, b, prefix + i, scale, window)
            torch.testing.assert_close(out[t].double(), ref_out, **TOL[dtype], msg=f"out seq {b} token {i}")
            torch.testing.assert_close(lse[t].double(), ref_lse, **LSE_TOL[dtype], msg=f"lse seq {b} token {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("window", [None, 6])
def test_prefill_small_tiles(device, dtype, num_heads, num_kv_heads, window):
    """16x16 tiles over 4-token blocks: many query tiles and key tiles crossing block boundaries."""
    _run_prefill(device, dtype, num_heads, num_kv_heads, window, seed=num_heads * 10 + num_kv_heads,
                 block_m=16, block_n=16)


@pytest.mark.parametrize("window", [37, 100])
def test_prefill_window_spanning_tiles(device, window):
    """A window wider than a 16x16 tile: query tiles with masked window-edge key tiles, unmasked
    tiles in between and masked diagonal tiles (37), and a window wider than the context (100)."""
    _run_prefill(device, torch.float32, 4, 2, window, seed=11, chunks=((40, 50), (0, 64)), num_decodes=1,
                 block_m=16, block_n=16)


@pytest.mark.parametrize("head_dim,block_size,window", [(64, 16, None), (128, 8, 11)])
def test_prefill_default_tiles(device, head_dim, block_size, window):
    """Default (64-wide) tiles, bigger heads, a chunk after a cached prefix longer than a tile."""
    _run_prefill(device, torch.float16, 4, 2, window, seed=3, head_dim=head_dim, block_size=block_size,
                 chunks=((0, 70), (67, 5), (0, 1)), num_decodes=1)


def test_prefill_rejects_bad_head_dim(device):
    q = torch.zeros(2, 2, 24, device=device)
    cache = torch.zeros(2, 2, 2, 4, 24, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention(q, cache, torch.tensor([0, 2]), torch.tensor([2]), torch.zeros(1, 1, dtype=torch.int64),
                          1.0)


# ---------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, None])
@pytest.mark.parametrize("window", [None, 10])
def test_decode(device, dtype, num_heads, num_kv_heads, num_splits, window):
    seq_lens = [1, 7, 33, 50, 17]  # ragged; none divides evenly into the split chunks
    head_dim, block_size = 16, 4
    seed = num_heads * 100 + num_kv_heads * 10 + (num_splits or 0)
    paged = Paged(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = 0.3
    out, lse = decode_attention(q, paged.cache, paged.seq_lens, paged.block_tables, scale, window,
                                num_splits, block_n=16)
    for b, n in enumerate(seq_lens):
        ref_out, ref_lse = reference(q[b], paged, b, n - 1, scale, window)
        torch.testing.assert_close(out[b].double(), ref_out, **TOL[dtype], msg=f"out seq {b}")
        torch.testing.assert_close(lse[b].double(), ref_lse, **LSE_TOL[dtype], msg=f"lse seq {b}")


def test_decode_long_context_default_splits(device):
    """Default tiles and split count (ceil(600 / 256) = 3 splits), head_dim 64, a 16-head group."""
    seq_lens = [600, 3, 257]
    paged = Paged(seq_lens, 16, 1, 64, torch.float16, device, seed=5)
    q = torch.randn(len(seq_lens), 16, 64, generator=torch.Generator().manual_seed(6)).half().to(device)
    out, lse = decode_attention(q, paged.cache, paged.seq_lens, paged.block_tables, 0.125)
    for b, n in enumerate(seq_lens):
        ref_out, ref_lse = reference(q[b], paged, b, n - 1, 0.125, None)
        torch.testing.assert_close(out[b].double(), ref_out, **TOL[torch.float16])
        torch.testing.assert_close(lse[b].double(), ref_lse, **LSE_TOL[torch.float16])


# ---------------------------------------------------------------------------------- int8 cache
def quantize_paged(paged: Paged, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Make `paged` an int8 cache: its data, each token row scaled by a random magnitude (so the
    scales vary token to token), quantised. Returns the (codes, scales) the kernels read; the
    reference then reads `paged.cache`, their fp64 dequantisation."""
    gen = torch.Generator().manual_seed(seed + 2)
    data = paged.cache.float().cpu()
    data = data * torch.exp(torch.randn(*data.shape[:4], 1, generator=gen))
    data[0, 0, 0, 0] = 0  # an all-zero row: scale 0
    codes, scales = quantize_int8(data)
    paged.cache = (codes.double() * scales).to(paged.cache.device)
    return codes.to(paged.cache.device), scales.to(paged.cache.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 32), (3, 24)])
def test_store_int8_matches_quantize_int8(device, dtype, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(7)
    rows = int8_test_rows(head_dim, dtype)
    rows = torch.cat([rows, torch.randn(-rows.shape[0] % num_kv_heads, head_dim, generator=gen)]).to(dtype)
    assert quantize_int8(rows[0])[0][head_dim // 2 - 2:head_dim // 2 + 2].tolist() == [-2, 0, 0, 2]  # ties to even
    num_tokens = rows.shape[0] // num_kv_heads
    k, v = (x.reshape(num_tokens, num_kv_heads, head_dim).to(device) for x in (rows, rows.flip(0)))
    num_blocks, block_size = -(-num_tokens // 4) + 2, 4
    cache = (torch.randint(-127, 128, (2, num_blocks, num_kv_heads, block_size, head_dim), generator=gen,
                           dtype=torch.int8).to(device),
             torch.rand(2, num_blocks, num_kv_heads, block_size, 1, generator=gen).to(device))
    before = tuple(c.clone() for c in cache)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # padding token: must not be written anywhere
    store_kv(k, v, cache, slots.to(device))
    expected = tuple(c.clone() for c in before)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            for half, x in enumerate((k, v)):
                codes, scales = quantize_int8(x[t])
                expected[0][half, slot // block_size, :, slot % block_size] = codes
                expected[1][half, slot // block_size, :, slot % block_size] = scales
    assert torch.equal(cache[0], expected[0]), "codes differ from quantize_int8"
    assert torch.equal(cache[1], expected[1]), "scales differ from quantize_int8"


@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads,window,block_size,block_mn,dtype",
    [
        (32, 4, 4, None, 4, 16, torch.float32),
        (32, 8, 2, 6, 4, 16, torch.float16),
        (64, 4, 1, 10, 16, None, torch.float32),
        (128, 8, 2, None, 8, None, torch.float16),
    ],
)
def test_prefill_int8(device, head_dim, num_heads, num_kv_heads, window, block_size, block_mn, dtype):
    """Chunks after cached prefixes that cross block and tile boundaries, read from int8 codes."""
    chunks = ((0, 1), (0, 13), (9, 7), (21, 19)) if block_mn else ((0, 70), (67, 5), (0, 1))
    _run_prefill(device, dtype, num_heads, num_kv_heads, window, seed=head_dim + num_heads, head_dim=head_dim,
                 block_size=block_size, chunks=chunks, num_decodes=1, int8=True, block_m=block_mn, block_n=block_mn)


@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads,window,block_size,num_splits,dtype",
    [
        (32, 4, 4, None, 4, 1, torch.float32),
        (32, 8, 2, 10, 4, 3, torch.float16),
        (64, 4, 1, None, 16, None, torch.float16),
        (128, 8, 2, 7, 8, 2, torch.float32),
        (128, 4, 4, None, 16, 5, torch.float16),
    ],
)
def test_decode_int8(device, head_dim, num_heads, num_kv_heads, window, block_size, num_splits, dtype):
    seq_lens = [1, 7, 33, 50, 17]
    seed = head_dim + num_heads + (num_splits or 0)
    paged = Paged(seq_lens, block_size, num_kv_heads, head_dim, torch.float32, device, seed)
    cache = quantize_paged(paged, seed)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    q = q.to(dtype).to(device)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = decode_attention(q, cache, paged.seq_lens, paged.block_tables, scale, window, num_splits, block_n=16)
    for b, n in enumerate(seq_lens):
        ref_out, ref_lse = reference(q[b], paged, b, n - 1, scale, window)
        torch.testing.assert_close(out[b].double(), ref_out, **TOL[dtype], msg=f"out seq {b}")
        torch.testing.assert_close(lse[b].double(), ref_lse, **LSE_TOL[dtype], msg=f"lse seq {b}")


def test_int8_cache_is_checked(device):
    q = torch.zeros(1, 2, 16, device=device)
    codes = torch.zeros(2, 2, 2, 4, 16, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="int8 KV cache"):
        decode_attention(q, (codes, torch.zeros(2, 2, 2, 4, 16, device=device)), torch.tensor([1]),
                         torch.zeros(1, 1, dtype=torch.int64), 1.0)
