"""KIVI (kivi4, kivi2) against references written independently here: the quantisation rule in
numpy, a sequence stored chunk by chunk against its whole token stream quantised at once, and the
torch-native attention against an fp64 loop over the dequantised cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.kivi import (
    KIVI_GROUP,
    KiviStep,
    dequantize_blocks,
    pack_codes,
    quantised_length,
    quantize_key_group,
    quantize_values,
    shareable_prefix,
    store_kivi,
    unpack_codes,
)
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.attention.torch_native import TorchNativeBackend

G = KIVI_GROUP


def numpy_asym(x: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KIVI's rule in numpy float32: min/max over `axis`, fp16 scale and zero, codes from them."""
    levels = np.float32(2**bits - 1)
    x = x.astype(np.float32)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    scale16 = ((hi - lo) / levels).astype(np.float16)
    zero16 = lo.astype(np.float16)
    s, z = scale16.astype(np.float32), zero16.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint((x - z) * inv), 0, levels).astype(np.uint8)
    return codes, scale16, zero16


def numpy_dequant_keys(x: np.ndarray, bits: int) -> np.ndarray:
    """Keys [n, KVH, D] (n a multiple of G), each 32-token group quantised per channel, read back."""
    out = np.empty_like(x, dtype=np.float64)
    for g in range(0, x.shape[0], G):
        c, s, z = numpy_asym(x[g:g + G], bits, axis=0)
        out[g:g + G] = c * s.astype(np.float64) + z.astype(np.float64)
    return out


def numpy_dequant_values(x: np.ndarray, bits: int) -> np.ndarray:
    n, h, d = x.shape
    c, s, z = numpy_asym(x.reshape(n, h, d // G, G), bits, axis=-1)
    return (c * s.astype(np.float64) + z.astype(np.float64)).reshape(n, h, d)


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_layout_and_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 2, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 2, 64 * bits // 8)
    per_byte = 8 // bits
    # Channel per_byte*i + j sits in bits [bits*j, bits*(j+1)) of byte i.
    assert int(packed[0, 0, 0]) == sum(int(codes[0, 0, j]) << (bits * j) for j in range(per_byte))
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantisation_matches_numpy(bits, dtype):
    torch.manual_seed(0)
    keys = (torch.randn(G, 3, 64) * torch.logspace(-2, 2, 64)).to(dtype)  # outlier channels, as KIVI expects
    keys[:, 0, 5] = 1.5  # a constant channel: scale 0, codes 0, read back exactly as the zero point
    values = torch.randn(7, 3, 64).to(dtype)
    packed, meta = quantize_key_group(keys, bits)
    c, s, z = numpy_asym(keys.float().numpy(), bits, axis=0)
    np.testing.assert_array_equal(unpack_codes(packed, bits).numpy(), c)
    assert meta.shape == (3, 2, 64) and meta.dtype == torch.float16
    np.testing.assert_array_equal(meta[:, 0].numpy(), s[0])
    np.testing.assert_array_equal(meta[:, 1].numpy(), z[0])
    assert meta[0, 0, 5] == 0 and unpack_codes(packed, bits)[:, 0, 5].eq(0).all()
    packed_v, meta_v = quantize_values(values, bits)
    cv, sv, zv = numpy_asym(values.float().numpy().reshape(7, 3, 2, G), bits, axis=-1)
    np.testing.assert_array_equal(unpack_codes(packed_v, bits).numpy(), cv.reshape(7, 3, 64))
    assert meta_v.shape == (7, 3, 4)  # [scale, scale, zero, zero] per row: 2 groups of 32 channels
    np.testing.assert_array_equal(meta_v[..., :2].numpy(), sv[..., 0])
    np.testing.assert_array_equal(meta_v[..., 2:].numpy(), zv[..., 0])
    # Read back within half a step (plus fp16 rounding of the zero point) of the input.
    x = keys.float()
    back = torch.tensor(numpy_dequant_keys(keys.float().numpy(), bits)).float()
    step = (x.amax(0) - x.amin(0)) / (2**bits - 1)
    assert ((back - x).abs() <= step / 2 + 2e-3 * x.abs().amax(0) + 1e-6).all()


def test_spec_counts_codes_meta_and_ring():
    dense = KVCacheSpec.for_format("auto", 30, 3, 64, 32, torch.bfloat16)
    kivi2 = KVCacheSpec.for_format("kivi2", 30, 3, 64, 32, torch.bfloat16, residual_tokens=128, residual_slots=8)
    kivi4 = KVCacheSpec.for_format("kivi4", 30, 3, 64, 32, torch.bfloat16, residual_tokens=128, residual_slots=8)
    # Per token, layer and kv head, keys and values each: D * bits / 8 code bytes and D / 16 fp16 entries.
    assert kivi2.bytes_per_token == 30 * 3 * 2 * (64 * 2 // 8 + 64 // 16 * 2)
    assert kivi4.bytes_per_token == 30 * 3 * 2 * (64 * 4 // 8 + 64 // 16 * 2)
    assert dense.bytes_per_token / kivi2.bytes_per_token == pytest.approx(16 / 3)  # 3 bits per element
    assert dense.bytes_per_token / kivi4.bytes_per_token == pytest.approx(16 / 5)
    # The ring: per layer [2, slots, KVH, R + G, D] of the model's dtype, outside the blocks.
    assert kivi2.residual_window == 160
    assert kivi2.fixed_bytes == 30 * 2 * 8 * 3 * 160 * 64 * 2
    budget = kivi2.fixed_bytes + 100 * kivi2.bytes_per_block + 5
    assert kivi2.num_blocks(budget) == 100
    codes, meta, ring = kivi2.allocate(4, "cpu")[0]
    assert codes.shape == (2, 4, 3, 32, 16) and codes.dtype == torch.uint8
    assert meta.shape == (2, 4, 3, 32, 4) and meta.dtype == torch.float16
    assert ring.shape == (2, 8, 3, 160, 64) and ring.dtype == torch.bfloat16
    assert kivi2.transferable and kivi2.wire_format != kivi4.wire_format
    other_r = KVCacheSpec.for_format("kivi2", 30, 3, 64, 32, torch.bfloat16, residual_tokens=64, residual_slots=8)
    assert other_r.wire_format != kivi2.wire_format  # R decides which tokens travel dense: both sides must agree
    assert TorchNativeBackend.supports(kivi2) and kivi2.kivi_bits == 2 and kivi4.kivi_bits == 4
    with pytest.raises(ValueError, match="multiples of 32"):
        KVCacheSpec.for_format("kivi4", 2, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        KVCacheSpec.for_format("kivi4", 2, 2, 64, 32, torch.float32, residual_tokens=100)


def test_quantised_length_and_shareable_prefix():
    # R = 128: from n >= 160 on, the newest 128..159 tokens stay dense, a group at a time.
    assert [quantised_length(n, 128) for n in (0, 128, 159, 160, 191, 192, 1000)] == [0, 0, 0, 32, 32, 64, 864]
    assert all(128 <= n - quantised_length(n, 128) < 160 for n in range(128, 2000))
    assert quantised_length(100, 128, floor=64) == 64  # a prefix hit's blocks are quantised already
    assert quantised_length(0, 0) == 0 and quantised_length(33, 0) == 32
    # A hit of 10 blocks of 32 keeps out the 4 blocks that may hold dense tokens.
    assert shareable_prefix(320, 128, 32) == 192 and shareable_prefix(320, 100, 64) == 192
    assert all(shareable_prefix(n, 128, 32) <= quantised_length(n, 128) for n in range(0, 2000, 32))


def _run_steps(bits, chunks, residual, block_size, kvh=2, d=64, floor=0, seed=0):
    """Store one sequence's keys/values chunk by chunk, as the runner would; returns the cache, the
    dense stream and the table."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(chunks) + floor
    keys = torch.randn(n, kvh, d, generator=gen) * torch.linspace(0.1, 4, d)
    values = torch.randn(n, kvh, d, generator=gen)
    num_blocks = math.ceil(n / block_size) + 6
    spec = KVCacheSpec.for_format(f"kivi{bits}", 1, kvh, d, block_size, torch.float32,
                                  residual_tokens=residual, residual_slots=3)
    cache = spec.allocate(num_blocks, "cpu")[0]
    table = list(torch.randperm(num_blocks, generator=gen)[:math.ceil(n / block_size)].tolist())
    slot = 2
    if floor:  # a prefix hit: its blocks hold [0, floor) quantised already
        step = KiviStep.build(bits, 0, block_size, [slot], [0], [floor], [0], [0], [table], torch.device("cpu"))
        store_kivi(cache, keys[:floor], values[:floor], step, block_size)
    start = floor
    for size in chunks:
        step = KiviStep.build(bits, residual, block_size, [slot], [start], [start + size], [floor], [0], [table],
                              torch.device("cpu"))
        store_kivi(cache, keys[start:start + size], values[start:start + size], step, block_size)
        start += size
    return spec, cache, keys, values, table, slot


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize(("chunks", "residual", "block_size", "floor"), [
    ([5, 70, 1, 1, 1, 33, 100, 3], 64, 64, 0),  # groups completed mid-chunk and mid-block
    ([200] + [1] * 40, 128, 32, 0),  # a long prompt, then decodes crossing group boundaries
    ([17, 1, 1, 90, 1], 0, 32, 0),  # R = 0: every completed group is quantised at once
    ([40, 1, 1, 100], 32, 64, 128),  # after a prefix hit of 128 quantised tokens
])
def test_store_chunk_by_chunk_matches_whole_stream(bits, chunks, residual, block_size, floor):
    spec, (codes, meta, ring), keys, values, table, slot = _run_steps(bits, chunks, residual, block_size,
                                                                     floor=floor)
    n = keys.shape[0]
    q = quantised_length(n, residual, floor)
    assert q % G == 0 and (q == floor or n - q >= residual)
    ids = torch.tensor(table)
    got_k = dequantize_blocks(codes[0][ids], meta[0][ids], bits, 0).transpose(1, 2).reshape(-1, 2, 64)[:q]
    got_v = dequantize_blocks(codes[1][ids], meta[1][ids], bits, 1).transpose(1, 2).reshape(-1, 2, 64)[:q]
    np.testing.assert_allclose(got_k.double().numpy(), numpy_dequant_keys(keys[:q].numpy(), bits), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_v.double().numpy(), numpy_dequant_values(values[:q].numpy(), bits),
                               rtol=0, atol=1e-6)
    # The ring holds [q, n) exactly (position p at index p % W).
    w = spec.residual_window
    for p in range(q, n):
        assert torch.equal(ring[0][slot, :, p % w], keys[p]) and torch.equal(ring[1][slot, :, p % w], values[p])


def naive_attention(q, ctx_k, ctx_v, own_k, own_v, scale, group):
    """fp64 loop: each query p of a chunk over the context (already dequantised or dense) and the chunk's
    keys up to itself."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        keys = torch.cat([ctx_k, own_k[:t + 1]]).double()
        vals = torch.cat([ctx_v, own_v[:t + 1]]).double()
        for h in range(q.shape[1]):
            s = keys[:, h // group] @ q[t, h].double() * scale
            out[t, h] = torch.softmax(s, 0) @ vals[:, h // group]
    return out


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(4, 2, 64), (2, 2, 128), (6, 1, 64)])
def test_attention_matches_fp64_over_dequantised_context(bits, heads, kv_heads, d):
    """Three sequences in one step (a decode, a chunk starting mid-group, a chunk after a prefix floor):
    each query reads [0, Q) as its blocks dequantise, [Q, start) from the ring, its chunk densely."""
    residual, bs = 64, 32
    seqs = [([150], 1), ([70, 30], 45), ([40], 17)]  # (chunks stored before, this step's chunk); seq 2 floor 64
    floors = [0, 0, 64]
    gen = torch.Generator().manual_seed(1)
    spec = KVCacheSpec.for_format(f"kivi{bits}", 1, kv_heads, d, bs, torch.float32, residual_tokens=residual,
                                  residual_slots=3)
    cache = spec.allocate(40, "cpu")[0]
    codes, meta, ring = cache
    perm = torch.randperm(40, generator=gen).tolist()
    tables, streams, starts = [], [], []
    for i, ((before, _), floor) in enumerate(zip(seqs, floors)):
        n = floor + sum(before) + seqs[i][1]
        tables.append(perm[i * 12:i * 12 + math.ceil(n / bs)])
        k = torch.randn(n, kv_heads, d, generator=gen) * torch.linspace(0.2, 3, d)
        v = torch.randn(n, kv_heads, d, generator=gen)
        streams.append((k, v))
        if floor:
            step = KiviStep.build(bits, 0, bs, [i], [0], [floor], [0], [0], [tables[i]], torch.device("cpu"))
            store_kivi(cache, k[:floor], v[:floor], step, bs)
        start = floor
        for size in before:
            step = KiviStep.build(bits, residual, bs, [i], [start], [start + size], [floor], [0], [tables[i]],
                                  torch.device("cpu"))
            store_kivi(cache, k[start:start + size], v[start:start + size], step, bs)
            start += size
        starts.append(start)
    sizes = [s[1] for s in seqs]
    qs = torch.randn(sum(sizes), heads, d, generator=gen)
    k_new = torch.cat([k[s:s + n] for (k, _), s, n in zip(streams, starts, sizes)])
    v_new = torch.cat([v[s:s + n] for (_, v), s, n in zip(streams, starts, sizes)])
    query_start = [0, sizes[0], sizes[0] + sizes[1]]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    seq_lens = [s + n for s, n in zip(starts, sizes)]
    step = KiviStep.build(bits, residual, bs, [0, 1, 2], starts, seq_lens, floors, query_start,
                          [t + [0] * (width - len(t)) for t in tables], torch.device("cpu"))
    meta_ = AttentionMetadata(
        slot_mapping=torch.zeros(sum(sizes), dtype=torch.long), seq_lens=torch.tensor(seq_lens),
        query_lens=torch.tensor(sizes), query_start_loc=torch.tensor(query_start + [sum(sizes)]),
        block_tables=padded, num_decodes=1, max_query_len=max(sizes), max_seq_len=max(seq_lens), block_size=bs,
        seq_lens_list=seq_lens, query_lens_list=sizes, kivi=step)
    scale = d**-0.5
    ring_before = ring.clone()
    out = TorchNativeBackend().forward(qs, k_new, v_new, cache, meta_, scale)
    # The reference: [0, Q) as numpy dequantises the stream's groups, [Q, start) and the chunk dense.
    for i, ((k, v), start, size) in enumerate(zip(streams, starts, sizes)):
        q_len = quantised_length(start, residual, floors[i])
        assert step.quantised_list[i] == q_len
        ctx_k = np.concatenate([numpy_dequant_keys(k[:q_len].numpy(), bits), k[q_len:start].double().numpy()])
        ctx_v = np.concatenate([numpy_dequant_values(v[:q_len].numpy(), bits), v[q_len:start].double().numpy()])
        # The ring held the dense part before the step.
        w = spec.residual_window
        for p in range(q_len, start):
            assert torch.equal(ring_before[0][i, :, p % w], k[p])
        ref = naive_attention(qs[query_start[i]:query_start[i] + size], torch.tensor(ctx_k), torch.tensor(ctx_v),
                              k[start:start + size], v[start:start + size], scale, heads // kv_heads)
        torch.testing.assert_close(out[query_start[i]:query_start[i] + size].double(), ref, atol=2e-5, rtol=1e-5)
    # And the step then stored its own tokens: each sequence's ring holds [Q_after, n).
    for i, ((k, _), n) in enumerate(zip(streams, seq_lens)):
        q_after = quantised_length(n, residual, floors[i])
        for p in range(max(q_after, starts[i]), n):
            assert torch.equal(ring[0][i, :, p % spec.residual_window], k[p])



@pytest.mark.parametrize("bits", [4, 2])
def test_read_and_compact_a_sequence(bits):
    """What a KV policy reads of a KIVI sequence (blocks below Q dequantised, the ring above), and a
    compaction (SnapKV's) that writes each head's kept tokens as a fresh sequence: its groups quantised
    anew, its newest tokens in the ring."""
    residual, bs = 64, 32
    spec, cache, keys, values, table, slot = _run_steps(bits, [150, 1, 1, 1], residual, bs)
    codes, meta, ring = cache
    n = keys.shape[0]
    q = quantised_length(n, residual)
    from kvflow.attention.kivi import compact_sequence, read_sequence

    got_k, got_v = read_sequence(cache, torch.tensor(table), n, q, slot)
    ref_k = np.concatenate([numpy_dequant_keys(keys[:q].numpy(), bits), keys[q:].double().numpy()])
    ref_v = np.concatenate([numpy_dequant_values(values[:q].numpy(), bits), values[q:].double().numpy()])
    np.testing.assert_allclose(got_k.transpose(0, 1).double().numpy(), ref_k, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_v.transpose(0, 1).double().numpy(), ref_v, atol=1e-6, rtol=0)
    # Keep 100 tokens per head (different ones per head) into 4 fresh blocks.
    gen = torch.Generator().manual_seed(3)
    keep = torch.stack([torch.randperm(n, generator=gen)[:100].sort().values for _ in range(2)])
    free = [b for b in range(codes.shape[1]) if b not in table][:4]
    compact_sequence(cache, got_k, got_v, keep, torch.tensor(free), slot, residual)
    new_q = quantised_length(100, residual)
    assert new_q == 32
    for h in range(2):
        sel_k, sel_v = got_k[h, keep[h]], got_v[h, keep[h]]  # [100, D]
        back_k, back_v = read_sequence(cache, torch.tensor(free), 100, new_q, slot)
        np.testing.assert_allclose(back_k[h, :new_q].double().numpy(),
                                   numpy_dequant_keys(sel_k[:new_q, None].numpy(), bits)[:, 0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(back_v[h, :new_q].double().numpy(),
                                   numpy_dequant_values(sel_v[:new_q, None].numpy(), bits)[:, 0], atol=1e-6, rtol=0)
        assert torch.equal(back_k[h, new_q:], sel_k[new_q:]) and torch.equal(back_v[h, new_q:], sel_v[new_q:])
