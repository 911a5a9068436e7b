"""Quantised KV formats against a numpy reference, and the torch-native backend reading them
against an fp64 reference over the dequantised cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.kv_quant import dequantize_int8, quantize_int8
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.attention.torch_native import TorchNativeBackend


def numpy_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 rule written independently in numpy float32: symmetric, a scale per row."""
    x = x.astype(np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(x * inv), -127, 127).astype(np.int8)  # rint: half to even
    return codes, (amax / np.float32(127)).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_matches_numpy_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * torch.logspace(-3, 3, 5)[None, :, None]).to(dtype)
    x[0, 0] = 0  # an all-zero row: scale 0, codes 0
    x[0, 1, :4] = torch.tensor([1.0, -2.0, 0.5, 254.0])  # 127 / 254 * 1.0 = 0.5: a tie, to even (0)
    x[0, 1, 4:] = 0
    codes, scales = quantize_int8(x)
    ref_codes, ref_scales = numpy_int8(x.float().numpy())
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (3, 5, 1)
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    np.testing.assert_array_equal(scales.numpy(), ref_scales)
    assert codes[0, 0].abs().sum() == 0 and scales[0, 0] == 0
    assert codes[0, 1, :4].tolist() == [0, -1, 0, 127]  # 1.0 * 127 / 254 = 0.5: half to even gives 0
    # Round trip: within half a step of each row's scale.
    err = (dequantize_int8(codes, scales) - x.float()).abs()
    assert (err <= scales / 2 + 1e-6 * x.float().abs()).all()


def test_int8_spec_counts_codes_and_scales():
    dense = KVCacheSpec.for_format("auto", 4, 2, 64, 16, torch.bfloat16)
    int8 = KVCacheSpec.for_format("int8", 4, 2, 64, 16, torch.bfloat16)
    assert dense.kv_dtype == "bfloat16" and int8.kv_dtype == "int8"
    assert dense.bytes_per_token == 4 * 2 * 2 * 64 * 2
    assert int8.bytes_per_token == 4 * 2 * 2 * (64 + 4)  # codes + one fp32 scale per token and head
    budget = 64 * dense.bytes_per_block
    assert int8.num_blocks(budget) == budget // int8.bytes_per_block > 1.8 * dense.num_blocks(budget)
    caches = int8.allocate(3, "cpu")
    codes, scales = caches[0]
    assert codes.shape == (2, 3, 2, 16, 64) and codes.dtype == torch.int8
    assert scales.shape == (2, 3, 2, 16, 1) and scales.dtype == torch.float32
    assert int8.wire_format != dense.wire_format and "int8" in int8.wire_format
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        KVCacheSpec.for_format("int4", 4, 2, 64, 16, torch.bfloat16)


def test_int8_spec_moves_codes_and_scales_per_token():
    """gather/scatter (KV transfer) carry codes and scales, between block sizes."""
    torch.manual_seed(1)
    a = KVCacheSpec.for_format("int8", 1, 2, 32, 4, torch.float32)
    b = KVCacheSpec.for_format("int8", 1, 2, 32, 8, torch.float32)
    src, dst = a.allocate(6, "cpu")[0], b.allocate(3, "cpu")[0]
    src[0].copy_(torch.randint(-127, 128, src[0].shape, dtype=torch.int8))
    src[1].copy_(torch.rand(src[1].shape))
    data = a.gather(src, [5, 1, 3], 11)
    assert data.numel() == a.wire_nbytes(11)
    b.scatter(dst, [2, 0], data)
    for part_a, part_b in zip(src, dst):
        tok_a = part_a[:, [5, 1, 3]].permute(0, 2, 1, 3, 4).reshape(2, 2, 12, -1)[:, :, :11]
        tok_b = part_b[:, [2, 0]].permute(0, 2, 1, 3, 4).reshape(2, 2, 16, -1)[:, :, :11]
        assert torch.equal(tok_a, tok_b)


def _metadata(chunks: list[tuple[int, int]], tables: torch.Tensor, block_size: int) -> AttentionMetadata:
    """chunks: (context before, new tokens) per sequence, decodes (1 new token) first."""
    seq_lens = [c + n for c, n in chunks]
    query_lens = [n for _, n in chunks]
    slots = []
    for i, (c, n) in enumerate(chunks):
        for p in range(c, c + n):
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
    starts = torch.zeros(len(chunks) + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), seq_lens=torch.tensor(seq_lens), query_lens=torch.tensor(query_lens),
        query_start_loc=starts, block_tables=tables, num_decodes=sum(1 for n in query_lens if n == 1),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=block_size,
        seq_lens_list=seq_lens, query_lens_list=query_lens,
    )


def _reference(q, codes, scales, meta, scale, window):
    """fp64 attention over the dequantised cache, query by query."""
    bs = meta.block_size
    deq = codes.double() * scales.double()  # [2, NB, KVH, bs, D]
    kvh = deq.shape[2]
    group = q.shape[1] // kvh
    out = torch.empty(q.shape, dtype=torch.float64)
    t = 0
    for i, (seq_len, q_len) in enumerate(zip(meta.seq_lens_list, meta.query_lens_list)):
        blocks = meta.block_tables[i, : -(-seq_len // bs)]
        k, v = (deq[h][blocks].transpose(0, 1).reshape(kvh, -1, deq.shape[-1])[:, :seq_len] for h in (0, 1))
        for j in range(q_len):
            pos = seq_len - q_len + j
            first = max(0, pos - window + 1) if window else 0
            s = q[t].double().view(kvh, group, -1) @ k[:, first:pos + 1].transpose(1, 2) * scale
            out[t] = (torch.softmax(s, -1) @ v[:, first:pos + 1]).view(q.shape[1:])
            t += 1
    return out


def _one_step(spec: KVCacheSpec, cache, dtype: torch.dtype, group: int, window: int | None):
    """One step through the torch backend over a 24-block cache of `spec`, with queries and keys
    of `dtype`: two decodes, a prefill chunk after a 6-token prefix and a fresh 5-token prompt.
    Returns (q, k, metadata, output)."""
    kvh, dim = spec.num_kv_heads, spec.head_dim
    tables = torch.randperm(24)[:20].view(4, 5)
    meta = _metadata([(9, 1), (17, 1), (6, 7), (0, 5)], tables, spec.block_size)
    t = int(meta.query_start_loc[-1])
    q = torch.randn(t, kvh * group, dim, dtype=dtype)
    k, v = torch.randn(t, kvh, dim, dtype=dtype), torch.randn(t, kvh, dim, dtype=dtype)
    backend = TorchNativeBackend()
    assert backend.supports(spec)
    backend.prepare(meta)
    return q, k, meta, backend.forward(q, k, v, cache, meta, dim**-0.5, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", [None, 7])
def test_torch_backend_reads_int8_cache(dtype, group, window):
    """Decodes and prefill chunks (one fresh, one after a cached prefix) over an int8 cache: the
    step's keys are stored as int8 and attention equals fp64 attention over the dequantised cache."""
    torch.manual_seed(2)
    kvh, dim, bs = 2, 32, 4
    spec = KVCacheSpec.for_format("int8", 1, kvh, dim, bs, dtype)
    cache = spec.allocate(24, "cpu")[0]
    codes, scales = cache
    prior = quantize_int8(torch.randn(2, 24, kvh, bs, dim))  # earlier tokens, already in the cache
    codes.copy_(prior[0])
    scales.copy_(prior[1])
    q, k, meta, out = _one_step(spec, cache, dtype, group, window)
    blocks, offsets = meta.slot_mapping // bs, meta.slot_mapping % bs
    new_codes, new_scales = quantize_int8(k)
    assert torch.equal(codes[0][blocks, :, offsets], new_codes)
    assert torch.equal(scales[0][blocks, :, offsets], new_scales)
    expected = _reference(q, codes, scales, meta, dim**-0.5, window)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- fp8_e4m3
def numpy_fp8_e4m3(v: np.ndarray) -> np.ndarray:
    """The float8_e4m3fn value nearest to each v (ties to even), saturated at +-448, in float64:
    3 mantissa bits, exponents down to -6, subnormals in steps of 2^-9."""
    v = np.clip(v.astype(np.float64), -448.0, 448.0)
    mag = np.abs(v)
    exp = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    step = 2.0 ** (np.maximum(exp, -6) - 3)
    return np.sign(v) * np.minimum(np.round(mag / step) * step, 448.0)  # np.round: half to even


def test_fp8_matches_numpy_reference():
    from kvflow.attention.kv_quant import dequantize_fp8, quantize_fp8

    torch.manual_seed(3)
    x = torch.randn(7, 3, 64) * torch.tensor([0.01, 1.0, 40.0])[None, :, None]
    # Head 1 (scale 0.5): saturation, underflow, and two ties (2.5 and 0.5 steps of 2^-9) to even.
    x[0, 1, :6] = torch.tensor([1000.0, -1000.0, 1e-9, 0.0, 1.25 * 2.0**-9, 0.25 * 2.0**-9])
    scales = torch.tensor([[0.001], [0.5], [0.25]])
    codes = quantize_fp8(x, scales)
    assert codes.dtype == torch.float8_e4m3fn
    expected = numpy_fp8_e4m3((x.double() / scales.double()).numpy().astype(np.float32))
    np.testing.assert_array_equal(codes.double().numpy(), expected)
    assert codes[0, 1, :6].float().tolist() == [448.0, -448.0, 0.0, 0.0, 2.0**-8, 0.0]
    np.testing.assert_array_equal(dequantize_fp8(codes, scales).numpy(), (codes.float() * scales).numpy())


def test_fp8_scales_calibrate_once_from_the_first_step():
    from kvflow.attention.kv_quant import FP8_HEADROOM, FP8_MAX, calibrate_fp8, fp8_calibrated

    head_scales = torch.zeros(2, 3, 1)
    k, v = torch.randn(5, 3, 16), torch.randn(5, 3, 16) * 10
    assert not fp8_calibrated(head_scales)
    calibrate_fp8(head_scales, k, v)
    assert fp8_calibrated(head_scales)
    torch.testing.assert_close(head_scales[0, :, 0], k.abs().amax(dim=(0, 2)) * FP8_HEADROOM / FP8_MAX)
    torch.testing.assert_close(head_scales[1, :, 0], v.abs().amax(dim=(0, 2)) * FP8_HEADROOM / FP8_MAX)
    before = head_scales.clone()
    calibrate_fp8(head_scales, k * 100, v * 100)  # later steps never move them
    assert torch.equal(head_scales, before)


def test_fp8_spec_counts_one_byte_per_element_and_its_scales():
    fp8 = KVCacheSpec.for_format("fp8_e4m3", 4, 2, 64, 16, torch.bfloat16)
    dense = KVCacheSpec.for_format("auto", 4, 2, 64, 16, torch.bfloat16)
    assert fp8.bytes_per_token == dense.bytes_per_token // 2
    assert fp8.fixed_bytes == 4 * 2 * 2 * 4  # per layer: [2, kv_heads, 1] fp32
    budget = 10 * fp8.bytes_per_block + fp8.fixed_bytes
    assert fp8.num_blocks(budget) == 10 and fp8.num_blocks(budget - 1) == 9
    codes, head_scales = fp8.allocate(3, "cpu")[0]
    assert codes.dtype == torch.float8_e4m3fn and head_scales.shape == (2, 2, 1) and not head_scales.any()
    assert not fp8.transferable  # calibrated scales: each instance would have its own
    given = KVCacheSpec.for_format("fp8_e4m3", 4, 2, 64, 16, torch.bfloat16, kv_scale=0.05)
    assert given.transferable and given.wire_format != fp8.wire_format
    assert (given.allocate(1, "cpu")[0][1] == 0.05).all()
    with pytest.raises(ValueError, match="kv_scale applies to kv_cache_dtype fp8_e4m3"):
        KVCacheSpec.for_format("int8", 4, 2, 64, 16, torch.bfloat16, kv_scale=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", [None, 7])
def test_torch_backend_reads_fp8_cache(dtype, group, window):
    """As for int8: the step's keys are stored as fp8 codes of the (here given) head scales and
    attention equals fp64 attention over codes * scales."""
    from kvflow.attention.kv_quant import quantize_fp8

    torch.manual_seed(4)
    kvh, dim, bs = 2, 32, 4
    spec = KVCacheSpec.for_format("fp8_e4m3", 1, kvh, dim, bs, dtype, kv_scale=0.02)
    cache = spec.allocate(24, "cpu")[0]
    codes, head_scales = cache
    head_scales[1] = 0.03
    codes.copy_(torch.randn(codes.shape).to(torch.float8_e4m3fn))
    q, k, meta, out = _one_step(spec, cache, dtype, group, window)
    blocks, offsets = meta.slot_mapping // bs, meta.slot_mapping % bs
    assert torch.equal(codes[0][blocks, :, offsets].float(), quantize_fp8(k, head_scales[0]).float())
    per_token = head_scales[:, None, :, None, :].expand(2, 24, kvh, bs, 1)  # as [2, NB, KVH, bs, 1]
    expected = _reference(q, codes.float(), per_token, meta, dim**-0.5, window)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
