"""TritonBackend.forward against TorchNativeBackend on the same step and the same cache (dense, int8
or fp8): both store the step's k/v and attend; outputs and the resulting caches must agree."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from kvflow.attention.backend import AttentionMetadata  # noqa: E402
from kvflow.attention.kv_quant import quantize_fp8, quantize_int8  # noqa: E402
from kvflow.attention.kv_spec import KVCacheSpec  # noqa: E402
from kvflow.attention.torch_native import TorchNativeBackend  # noqa: E402
from kvflow.attention.triton import TritonBackend  # noqa: E402
from kvflow.attention.triton import backend as triton_backend_module  # noqa: E402


def _step(seqs: list[tuple[int, int]], num_decodes: int, block_size: int, num_blocks: int,
          device: torch.device, seed: int) -> AttentionMetadata:
    """Metadata for sequences given as (cached prefix, new tokens), blocks from a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    nblocks = [-(-(p + n) // block_size) for p, n in seqs]
    assert sum(nblocks) <= num_blocks
    tables = torch.zeros(len(seqs), max(nblocks), dtype=torch.int64)
    slots = []
    for b, ((prefix, n), nb) in enumerate(zip(seqs, nblocks)):
        tables[b, :nb] = torch.tensor(perm[:nb])
        perm = perm[nb:]
        slots += [int(tables[b, pos // block_size]) * block_size + pos % block_size
                  for pos in range(prefix, prefix + n)]
    seq_lens = [p + n for p, n in seqs]
    query_lens = [n for _, n in seqs]
    qsl = torch.tensor([0] + query_lens).cumsum(0)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device), seq_lens=torch.tensor(seq_lens, device=device),
        query_lens=torch.tensor(query_lens, device=device), query_start_loc=qsl.to(device),
        block_tables=tables.to(device), num_decodes=num_decodes, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_size=block_size,
        token_seq_index=torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(query_lens)).to(device),
        seq_lens_list=seq_lens, query_lens_list=query_lens,
    )


@pytest.mark.parametrize(
    "seqs,num_decodes",
    [
        # 3 decodes (one a 1-token context), then a fresh prompt, a chunk after a cached prefix
        # that crosses blocks, and a single-token prefill.
        ([(0, 1), (12, 1), (40, 1), (0, 9), (13, 11), (20, 1)], 3),
        ([(5, 1), (30, 1)], 2),  # decodes only
        ([(0, 21)], 0),  # one fresh prompt only (torch-native's plain-causal path)
    ],
)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_torch_native(device, seqs, num_decodes, window, dtype):
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 4, 2, 32, 8, 20
    meta_native = _step(seqs, num_decodes, block_size, num_blocks, device, seed=11)
    meta_triton = _step(seqs, num_decodes, block_size, num_blocks, device, seed=11)
    gen = torch.Generator().manual_seed(12)
    num_tokens = meta_native.slot_mapping.shape[0]
    q, k, v = (torch.randn(num_tokens, h, head_dim, generator=gen).to(dtype).to(device)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    native, triton_backend = TorchNativeBackend(), TritonBackend()
    spec = KVCacheSpec.dense(1, num_kv_heads, head_dim, block_size, dtype)
    assert triton_backend.supports(spec) and native.supports(spec)  # both read the same layout
    cache = spec.allocate(num_blocks, device)[0]
    cache.copy_(torch.randn(cache.shape, generator=gen).to(dtype))  # the cached prefixes (and junk elsewhere)
    cache_native, cache_triton = cache.clone(), cache.clone()
    native.prepare(meta_native)
    triton_backend.prepare(meta_triton)
    scale = 1.0 / math.sqrt(head_dim)
    ref = native.forward(q, k, v, cache_native, meta_native, scale, window)
    out = triton_backend.forward(q, k, v, cache_triton, meta_triton, scale, window)
    assert out.shape == (num_tokens, num_heads, head_dim) and out.dtype == dtype
    assert torch.equal(cache_triton, cache_native)
    assert not torch.equal(cache_triton, cache)  # the step's k/v were stored
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def _quantised_step_inputs(seqs, num_decodes, num_heads, dtype, device):
    """One step's metadata (twice: one per backend), the generator that made them, and q, k, v
    (2 kv heads, head_dim 32, blocks of 8 in a 20-block cache)."""
    metas = [_step(seqs, num_decodes, 8, 20, device, seed=11) for _ in range(2)]
    gen = torch.Generator().manual_seed(12)
    num_tokens = metas[0].slot_mapping.shape[0]
    qkv = tuple(torch.randn(num_tokens, h, 32, generator=gen).to(dtype).to(device) for h in (num_heads, 2, 2))
    return metas, gen, qkv


def _forward(backend, meta, cache, q, k, v, scale, window):
    backend.prepare(meta)
    return backend.forward(q, k, v, cache, meta, scale, window)


@pytest.mark.parametrize(
    "seqs,num_decodes,num_heads,window,dtype",
    [
        ([(0, 1), (12, 1), (40, 1), (0, 9), (13, 11), (20, 1)], 3, 4, None, torch.float32),
        ([(0, 1), (12, 1), (40, 1), (0, 9), (13, 11), (20, 1)], 3, 8, 7, torch.float16),
        ([(0, 21)], 0, 8, None, torch.float16),  # a fresh prompt: torch-native attends to its k/v as stored
    ],
)
def test_forward_int8_matches_torch_native(device, seqs, num_decodes, num_heads, window, dtype):
    """An int8 cache: the same codes and scales stored, and attention over them close."""
    num_kv_heads, head_dim, block_size, num_blocks = 2, 32, 8, 20
    metas, gen, (q, k, v) = _quantised_step_inputs(seqs, num_decodes, num_heads, dtype, device)
    num_tokens = metas[0].slot_mapping.shape[0]
    spec = KVCacheSpec.for_format("int8", 1, num_kv_heads, head_dim, block_size, dtype)
    backends = TorchNativeBackend(), TritonBackend()
    assert all(b.supports(spec) for b in backends)
    codes, scales = spec.allocate(num_blocks, device)[0]
    prefix_codes, prefix_scales = quantize_int8(torch.randn(codes.shape, generator=gen) * 2)  # the cached prefixes
    codes.copy_(prefix_codes)
    scales.copy_(prefix_scales)
    caches = [(codes.clone(), scales.clone()) for _ in backends]
    scale = 1.0 / math.sqrt(head_dim)
    ref, out = (_forward(backend, meta, cache, q, k, v, scale, window)
                for backend, meta, cache in zip(backends, metas, caches))
    assert out.shape == (num_tokens, num_heads, head_dim) and out.dtype == dtype
    assert torch.equal(caches[1][0], caches[0][0]) and torch.equal(caches[1][1], caches[0][1])
    assert not torch.equal(caches[1][0], codes)  # the step's k/v were stored
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


@pytest.mark.parametrize(
    "seqs,num_decodes,num_heads,window,dtype,kv_scale",
    [
        ([(0, 1), (12, 1), (40, 1), (0, 9), (13, 11), (20, 1)], 3, 4, None, torch.float32, None),
        ([(0, 1), (12, 1), (40, 1), (0, 9), (13, 11), (20, 1)], 3, 8, 7, torch.float16, 0.02),
        ([(0, 21)], 0, 8, None, torch.float16, None),  # a fresh prompt: torch-native attends to its k/v as stored
    ],
)
def test_forward_fp8_matches_torch_native(device, monkeypatch, seqs, num_decodes, num_heads, window, dtype, kv_scale):
    """An fp8 cache, its scales given or (None) not yet calibrated: the first call calibrates the
    same scales, both store the same codes, and attention over them is close. A second call does
    not look at the scales again (no device sync) and gives the same output."""
    num_kv_heads, head_dim, block_size, num_blocks = 2, 32, 8, 20
    metas, gen, (q, k, v) = _quantised_step_inputs(seqs, num_decodes, num_heads, dtype, device)
    num_tokens = metas[0].slot_mapping.shape[0]
    spec = KVCacheSpec.for_format("fp8_e4m3", 1, num_kv_heads, head_dim, block_size, dtype, kv_scale)
    backends = TorchNativeBackend(), TritonBackend()
    assert all(b.supports(spec) for b in backends)
    codes, head_scales = spec.allocate(num_blocks, device)[0]
    assert torch.equal(head_scales, torch.full_like(head_scales, kv_scale or 0.0))
    codes.copy_(quantize_fp8(torch.randn(codes.shape, generator=gen), torch.tensor(0.015)))  # the cached prefixes
    caches = [(codes.clone(), head_scales.clone()) for _ in backends]
    scale = 1.0 / math.sqrt(head_dim)
    ref, out = (_forward(backend, meta, cache, q, k, v, scale, window)
                for backend, meta, cache in zip(backends, metas, caches))
    assert out.shape == (num_tokens, num_heads, head_dim) and out.dtype == dtype
    assert torch.equal(caches[1][1], caches[0][1]) and (caches[1][1] > 0).all()
    if kv_scale is not None:
        assert (caches[1][1] == kv_scale).all()
    assert torch.equal(caches[1][0].view(torch.uint8), caches[0][0].view(torch.uint8))
    assert not torch.equal(caches[1][0].view(torch.uint8), codes.view(torch.uint8))  # the step's k/v were stored
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)

    def no_calibration(*_args):
        raise AssertionError("the scales were checked again")

    monkeypatch.setattr(triton_backend_module, "calibrate_fp8", no_calibration)
    again = backends[1].forward(q, k, v, caches[1], metas[1], scale, window)
    assert torch.equal(again, out)
