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
