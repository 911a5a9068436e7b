"""The KV-cache spec: bytes per token and block, allocation, and per-token gather/scatter (the wire
layout KV transfer uses), against naive references."""

from __future__ import annotations

import pytest
import torch

from kvflow.attention.kv_spec import KVCacheSpec, KVComponent


def _tokens(spec: KVCacheSpec, data: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A dense spec's gathered bytes as [2, kv_heads, tokens, head_dim]."""
    return data.view(spec.dtype).view(2, spec.num_kv_heads, num_tokens, spec.head_dim)


def test_dense_bytes_match_the_shape():
    spec = KVCacheSpec.dense(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16)
    assert spec.bytes_per_token_per_layer == 2 * 3 * 64 * 2
    assert spec.bytes_per_token == 30 * 2 * 3 * 64 * 2
    assert spec.bytes_per_block == 16 * spec.bytes_per_token
    assert spec.num_blocks(10 * spec.bytes_per_block + 1) == 10
    caches = spec.allocate(7, "cpu")
    assert len(caches) == 30 and caches[0].shape == (2, 7, 3, 16, 64) and caches[0].dtype == torch.bfloat16
    assert sum(c.numel() * c.element_size() for c in caches) == 7 * spec.bytes_per_block  # the budget is exact


def test_codes_plus_scales_are_described_and_counted_exactly():
    """A quantised cache: int8 codes per element plus an fp32 scale per token and kv head."""
    spec = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=32, block_size=8,
                       components=(KVComponent("codes", torch.int8, 32), KVComponent("scales", torch.float32, 1)))
    assert not spec.is_dense
    assert spec.bytes_per_token_per_layer == 2 * 4 * (32 * 1 + 1 * 4)
    dense = KVCacheSpec.dense(2, 4, 32, 8, torch.bfloat16)
    assert dense.bytes_per_token / spec.bytes_per_token == pytest.approx(64 / 36)  # ~1.8x the tokens per GiB
    caches = spec.allocate(5, "cpu")
    codes, scales = caches[0]
    assert codes.shape == (2, 5, 4, 8, 32) and codes.dtype == torch.int8
    assert scales.shape == (2, 5, 4, 8, 1) and scales.dtype == torch.float32
    with pytest.raises(ValueError, match="no single dtype"):
        _ = spec.dtype
    # Both components travel together and land where they came from.
    torch.manual_seed(0)
    codes.copy_(torch.randint(-128, 128, codes.shape, dtype=torch.int8))
    scales.copy_(torch.rand(scales.shape))
    data = spec.gather(caches[0], [3, 1], 11)
    assert data.numel() == spec.wire_nbytes(11)
    target = spec.allocate(4, "cpu")[0]
    spec.scatter(target, [2, 0], data)
    assert torch.equal(spec.gather(target, [2, 0], 11), data)
    assert torch.equal(target[0][:, 2], codes[:, 3]) and torch.equal(target[1][:, 0, :, :3], scales[:, 1, :, :3])


def test_gather_scatter_roundtrip_across_block_sizes():
    torch.manual_seed(0)
    src_spec = KVCacheSpec.dense(1, 3, 8, 4, torch.float32)
    dst_spec = KVCacheSpec.dense(1, 3, 8, 8, torch.float32)
    src = torch.randn(2, 10, 3, 4, 8)  # [2, blocks, heads, block_size, dim]
    dst = torch.zeros(2, 12, 3, 8, 8)
    layer = src_spec.gather(src, [7, 2, 5, 9], 14)
    assert _tokens(src_spec, layer, 14).shape == (2, 3, 14, 8)
    dst_spec.scatter(dst, [11, 0], layer)
    again = dst_spec.gather(dst, [11, 0], 14)
    torch.testing.assert_close(again, layer, rtol=0, atol=0)
    expected = torch.cat([src[:, b] for b in (7, 2, 5, 9)], dim=2)[:, :, :14]  # naive reference
    torch.testing.assert_close(_tokens(src_spec, layer, 14), expected, rtol=0, atol=0)


def test_partial_layers_from_any_start():
    """A sibling's pull starts at a decode-side block boundary, anywhere in a prefill-side block."""
    torch.manual_seed(0)
    src_spec = KVCacheSpec.dense(1, 3, 8, 4, torch.float32)
    dst_spec = KVCacheSpec.dense(1, 3, 8, 8, torch.float32)
    src = torch.randn(2, 10, 3, 4, 8)  # [2, blocks, heads, block_size, dim]
    whole = _tokens(src_spec, src_spec.gather(src, [7, 2, 5, 9], 14), 14)
    for start in range(15):
        part = src_spec.gather(src, [7, 2, 5, 9], 14, start)
        torch.testing.assert_close(_tokens(src_spec, part, 14 - start), whole[:, :, start:], rtol=0, atol=0)
        dst = torch.zeros(2, 12, 3, 8, 8)
        dst_spec.scatter(dst, [11, 0], part, start)
        torch.testing.assert_close(dst_spec.gather(dst, [11, 0], 14, start), part, rtol=0, atol=0)
        assert not dst_spec.gather(dst, [11, 0], start).any()  # the shared slots are left alone


def test_wire_format_names_what_must_agree():
    a = KVCacheSpec.dense(2, 4, 64, 16, torch.bfloat16)
    assert a.wire_format == KVCacheSpec.dense(2, 4, 64, 8, torch.bfloat16).wire_format  # block size may differ
    assert a.wire_format != KVCacheSpec.dense(2, 4, 64, 16, torch.float16).wire_format
    assert a.wire_format != KVCacheSpec.dense(2, 2, 64, 16, torch.bfloat16).wire_format


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="layout"):
        KVCacheSpec(1, 1, 8, 4, (KVComponent("kv", torch.float32, 8),), layout="token_major")
    with pytest.raises(ValueError, match="own name"):
        KVCacheSpec(1, 1, 8, 4, (KVComponent("a", torch.int8, 8), KVComponent("a", torch.float32, 1)))
    with pytest.raises(ValueError, match="whole number of tokens"):
        spec = KVCacheSpec.dense(1, 1, 8, 4, torch.float32)
        spec.scatter(torch.zeros(2, 2, 1, 4, 8), [0, 1], torch.zeros(7, dtype=torch.uint8))


@pytest.mark.parametrize("num_tokens, start", [(20, 0), (100, 0), (130, 32), (161, 64), (200, 96)])
def test_kivi_transfer_moves_codes_below_q_and_the_ring_rows(num_tokens, start):
    """A KIVI prompt crosses as its blocks' codes and meta for positions [start, Q) and its ring rows
    [Q, n) in the model's dtype (Q = kivi.quantised_length); they land in the other side's blocks (of
    another size) and ring slot at the same cache indices, and nothing else is written."""
    residual, window = 64, 96
    src_spec = KVCacheSpec.for_format("kivi4", 1, 2, 64, 32, torch.float32, residual_tokens=residual,
                                      residual_slots=3)
    dst_spec = KVCacheSpec.for_format("kivi4", 1, 2, 64, 64, torch.float32, residual_tokens=residual,
                                      residual_slots=2)
    assert src_spec.wire_format == dst_spec.wire_format and src_spec.residual_window == window
    torch.manual_seed(0)
    src = src_spec.allocate(8, "cpu")[0]
    for part in src:
        part.copy_(torch.randint(0, 200, part.shape).to(part.dtype))
    src_blocks, slot = [5, 1, 7, 0, 3, 2, 6], 2
    q = max(0, 32 * ((num_tokens - residual) // 32))
    assert src_spec.wire_split(num_tokens) == q
    residual_rows = src_spec.gather_residual(src, slot, num_tokens)
    data = src_spec.gather(src, src_blocks, num_tokens, start, residual_rows)
    per_token = 2 * 2 * (32 + 8)  # keys and values, 2 kv heads, 32 code bytes + 4 fp16 meta
    assert data.numel() == src_spec.wire_nbytes(num_tokens, start) == (
        (q - start) * per_token + (num_tokens - q) * 2 * 2 * 64 * 4)

    dst = dst_spec.allocate(5, "cpu")[0]
    dst_blocks, dst_slot = [4, 0, 2, 1], 1
    dst_spec.scatter(dst, dst_blocks, data, start, num_tokens, dst_slot)
    for i in range(2):  # codes and meta: positions [start, Q) at the same cache index, the rest untouched
        src_tokens = src[i][:, src_blocks].transpose(1, 2).reshape(2, 2, -1, src[i].shape[-1])
        dst_tokens = dst[i][:, dst_blocks].transpose(1, 2).reshape(2, 2, -1, dst[i].shape[-1])
        assert torch.equal(dst_tokens[:, :, start:q], src_tokens[:, :, start:q])
        assert not dst_tokens[:, :, :start].any() and not dst_tokens[:, :, q:].any()
        assert not dst[i][:, 3].any()  # a block not in the table
    ring_src, ring_dst = src[2][:, slot], dst[2][:, dst_slot]
    written = torch.zeros(window, dtype=torch.bool)
    for p in range(q, num_tokens):
        assert torch.equal(ring_dst[:, :, p % window], ring_src[:, :, p % window])
        written[p % window] = True
    assert not ring_dst[:, :, ~written].any() and not dst[2][:, 0].any()
    # Without the ring rows, or from past Q, a KIVI transfer is refused.
    with pytest.raises(ValueError, match="ring rows"):
        src_spec.gather(src, src_blocks, num_tokens, start)
    with pytest.raises(ValueError, match="ring slot"):
        dst_spec.scatter(dst, dst_blocks, data, start)
