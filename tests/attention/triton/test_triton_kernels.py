"""The Triton kernels (store_kv, varlen paged prefill, flash-decoding) against a naive fp64
reference written here, independent of any backend: gather each sequence's keys through its block
table, mask causally (and by sliding window), softmax(QK^T * scale) V, and logsumexp. With an int8
cache the store must reproduce kv_quant.quantize_int8 bit for bit, and attention the reference over
the dequantised cache; the same with an fp8_e4m3 cache and kv_quant.quantize_fp8."""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from kvflow.attention.kv_quant import FP8_MAX, calibrate_fp8, quantize_fp8, quantize_int8  # noqa: E402
from kvflow.attention.triton import decode, decode_attention, prefill, prefill_attention, store_kv  # noqa: E402
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
                 chunks=((0, 1), (0, 13), (9, 7), (21, 19)), num_decodes=2, int8=False, fp8=False, **kw):
    """chunks: (cached prefix, new tokens) per prefill sequence, after `num_decodes` decodes."""
    rng = random.Random(seed)
    decodes = [(rng.randint(0, 12), 1) for _ in range(num_decodes)]
    seqs = decodes + list(chunks)
    seq_lens = [p + n for p, n in seqs]
    paged = Paged(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, seed)
    cache = quantize_paged(paged, seed) if int8 else quantize_paged_fp8(paged, seed) if fp8 else paged.cache
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
    check_quantised_decode(device, quantize_paged, head_dim, num_heads, num_kv_heads, window, block_size,
                           num_splits, dtype)


def check_quantised_decode(device, quantize, head_dim, num_heads, num_kv_heads, window, block_size, num_splits,
                           dtype):
    """Decode over the cache `quantize(paged, seed)` makes of five sequences, against the fp64
    reference over the dequantised values (quantize_paged* store them back in `paged`)."""
    seq_lens = [1, 7, 33, 50, 17]
    seed = head_dim + num_heads + (num_splits or 0)
    paged = Paged(seq_lens, block_size, num_kv_heads, head_dim, torch.float32, device, seed)
    cache = quantize(paged, seed)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    q = q.to(dtype).to(device)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = decode_attention(q, cache, paged.seq_lens, paged.block_tables, scale, window, num_splits, block_n=16)
    for b, n in enumerate(seq_lens):
        ref_out, ref_lse = reference(q[b], paged, b, n - 1, scale, window)
        torch.testing.assert_close(out[b].double(), ref_out, **TOL[dtype], msg=f"out seq {b}")
        torch.testing.assert_close(lse[b].double(), ref_lse, **LSE_TOL[dtype], msg=f"lse seq {b}")


@pytest.mark.parametrize("codes_dtype,scales_width,message", [
    (torch.int8, 16, "int8 KV cache"),  # per-token scales must have width 1
    (torch.float8_e4m3fn, 1, "fp8 KV cache"),  # fp8 scales are per kv head, not per token
])
def test_quantised_cache_is_checked(device, codes_dtype, scales_width, message):
    q = torch.zeros(1, 2, 16, device=device)
    codes = torch.zeros(2, 2, 2, 4, 16, dtype=codes_dtype, device=device)
    with pytest.raises(ValueError, match=message):
        decode_attention(q, (codes, torch.zeros(2, 2, 2, 4, scales_width, device=device)), torch.tensor([1]),
                         torch.zeros(1, 1, dtype=torch.int64), 1.0)


# ---------------------------------------------------------------------------------- fp8 cache
def quantize_paged_fp8(paged: Paged, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Make `paged` an fp8 cache: its data, each token row scaled by a random magnitude, quantised
    with random per-head key and value scales (a few values saturate, small ones are subnormal
    codes). Returns the (codes, head_scales) the kernels read; the reference then reads
    `paged.cache`, codes.double() * head_scales."""
    gen = torch.Generator().manual_seed(seed + 2)
    data = paged.cache.float().cpu()
    data = data * torch.exp(torch.randn(*data.shape[:4], 1, generator=gen))
    num_kv_heads = data.shape[2]
    head_scales = 0.005 + 0.02 * torch.rand(2, num_kv_heads, 1, generator=gen)
    codes = torch.stack([quantize_fp8(data[i], head_scales[i][:, None]) for i in (0, 1)])
    assert (codes.float().abs() == FP8_MAX).any() and (codes.float().abs() < 2 ** -6).any()
    paged.cache = (codes.double() * head_scales.view(2, 1, num_kv_heads, 1, 1)).to(paged.cache.device)
    return codes.to(paged.cache.device), head_scales.to(paged.cache.device)


def fp8_test_values(scale: float, dtype: torch.dtype, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` values of `dtype` that test an fp8 quantiser with head scale `scale` against
    kv_quant.quantize_fp8: saturation (|x| / scale >= 448) and zeros; with a power-of-two scale,
    every tie between neighbouring fp8 values, normal and subnormal, which must round to even;
    with another scale, values a few ulps from a tie, first those (fp32) whose codes depend on
    dividing by the scale (correctly rounded), not multiplying by its reciprocal; then random values of magnitudes
    1e-4..1e4 times the scale. Signs are random."""
    grid = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0, 2^-9, ..., 448
    mids = (grid[1:] + grid[:-1]) / 2
    s = torch.tensor(scale)
    if scale == 2.0 ** round(math.log2(scale)):
        special = mids * s
    else:
        eps = torch.finfo(dtype).eps
        near = torch.cat([(mids * s * (1 + j * eps / 2)).to(dtype).float() for j in range(-3, 4)])
        by_reciprocal = (near * s.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        tell = quantize_fp8(near, s).view(torch.uint8) != by_reciprocal.view(torch.uint8)
        # (16-bit inputs divided in fp32 hardly ever land within an fp32 ulp of a tie)
        assert tell.sum() >= 4 or dtype != torch.float32, "no values tell division from the reciprocal's product"
        special = torch.cat([near[tell], near[~tell]])
    fixed = torch.cat([torch.tensor([448.0, 449.0, 464.0, 465.0, 1e3, 2e4]) * s, torch.zeros(2), special])
    magnitudes = torch.logspace(-4, 4, count)[torch.randperm(count, generator=gen)]
    values = torch.cat([fixed[:count // 2], torch.randn(count, generator=gen) * magnitudes * s])[:count]
    return values.to(dtype) * torch.where(torch.rand(count, generator=gen) < 0.5, -1.0, 1.0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 32), (3, 24)])
def test_store_fp8_matches_quantize_fp8(device, dtype, num_kv_heads, head_dim):
    """Codes bit-identical to quantize_fp8 (ties to even, subnormal codes, saturation, correctly
    rounded division), the given scales untouched; and with uncalibrated scales (0), first the
    scales calibrate_fp8 sets (from every token of the step, as the torch backend does)."""
    ties = torch.tensor([[2 ** -10, 3 * 2 ** -10, 1.0625, 1.1875, 464.0, 1e6]])
    assert quantize_fp8(ties, torch.ones(1, 1)).float().tolist() == [[0.0, 2 ** -8, 1.0, 1.25, 448.0, 448.0]]
    gen = torch.Generator().manual_seed(7)
    num_tokens, block_size = 16, 4
    scales = torch.tensor([[1.0, 0.3, 0.0625], [0.7, 2.0, 1.9]])[:, :num_kv_heads, None]  # [2, KVH, 1]
    k, v = (torch.stack([fp8_test_values(float(scales[half, h]), dtype, num_tokens * head_dim, gen)
                         .view(num_tokens, head_dim) for h in range(num_kv_heads)], 1).to(device)
            for half in (0, 1))
    num_blocks = num_tokens // block_size + 2
    codes = torch.randint(0, 0x7F, (2, num_blocks, num_kv_heads, block_size, head_dim), generator=gen,
                          dtype=torch.uint8).view(torch.float8_e4m3fn).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # padding token: must not be written anywhere
    slots, scales = slots.to(device), scales.to(device)
    valid = slots >= 0

    def expected(head_scales: torch.Tensor) -> torch.Tensor:
        out = codes.clone()
        for half, x in enumerate((k, v)):
            blocks, offsets = slots[valid] // block_size, slots[valid] % block_size
            out[half][blocks, :, offsets] = quantize_fp8(x[valid], head_scales[half])
        return out.view(torch.uint8)

    cache = (codes.clone(), scales.clone())
    store_kv(k, v, cache, slots)
    bits = expected(scales) % 0x80
    assert (bits == 0x7E).any() and ((bits > 0) & (bits < 8)).any()  # saturated and subnormal codes
    assert torch.equal(cache[0].view(torch.uint8), expected(scales)), "codes differ from quantize_fp8"
    assert torch.equal(cache[1], scales), "given scales changed"

    cache = (codes.clone(), torch.zeros_like(scales))
    store_kv(k, v, cache, slots)
    calibrated = torch.zeros_like(scales)
    calibrate_fp8(calibrated, k, v)
    assert (calibrated > 0).all() and torch.equal(cache[1], calibrated)
    assert torch.equal(cache[0].view(torch.uint8), expected(calibrated))


@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads,window,block_size,block_mn,dtype,native",
    [
        (32, 4, 4, None, 4, 16, torch.float32, False),
        (32, 8, 2, 6, 4, 16, torch.float16, False),
        (64, 4, 1, 10, 16, None, torch.float32, False),
        (128, 8, 2, None, 8, None, torch.float16, False),
        (32, 8, 2, 6, 4, 16, torch.float16, True),
    ],
)
def test_prefill_fp8(device, monkeypatch, head_dim, num_heads, num_kv_heads, window, block_size, block_mn, dtype,
                     native):
    """Chunks after cached prefixes that cross block and tile boundaries, read from fp8 codes (by
    integer arithmetic, or with `native` by Triton's float8e4nv conversion, as on sm_89+)."""
    if native:
        monkeypatch.setattr(prefill, "fp8_native", lambda _capability: True)
    chunks = ((0, 1), (0, 13), (9, 7), (21, 19)) if block_mn else ((0, 70), (67, 5), (0, 1))
    _run_prefill(device, dtype, num_heads, num_kv_heads, window, seed=head_dim + num_heads, head_dim=head_dim,
                 block_size=block_size, chunks=chunks, num_decodes=1, fp8=True, block_m=block_mn, block_n=block_mn)


@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads,window,block_size,num_splits,dtype,native",
    [
        (32, 4, 4, None, 4, 1, torch.float32, False),
        (32, 8, 2, 10, 4, 3, torch.float16, False),
        (64, 4, 1, None, 16, None, torch.float16, False),
        (128, 8, 2, 7, 8, 2, torch.float32, False),
        (128, 4, 4, None, 16, 5, torch.float16, False),
        (32, 8, 2, 10, 4, 3, torch.float16, True),
    ],
)
def test_decode_fp8(device, monkeypatch, head_dim, num_heads, num_kv_heads, window, block_size, num_splits, dtype,
                    native):
    if native:
        monkeypatch.setattr(decode, "fp8_native", lambda _capability: True)
    check_quantised_decode(device, quantize_paged_fp8, head_dim, num_heads, num_kv_heads, window, block_size,
                           num_splits, dtype)
