"""The C++ CPU kernels, one by one, against plain PyTorch references; and the engine's fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kvflow import LLM, SamplingParams
from kvflow.config import RopeConfig
from kvflow.model import cpu_kernels
from kvflow.model.layers import RMSNorm, RotaryEmbedding
from tests.model.test_parity import mixed_prompts

ext = cpu_kernels.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="no C++ compiler: the engine runs the PyTorch modules")
EMPTY = torch.empty(0)
BF16_ULP = 2**-7  # relative spacing of bf16 values


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: equal to rounding; bf16: within one bf16 step (summation order can move a rounding)."""
    tol = 1e-5 if dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_module(dtype):
    torch.manual_seed(0)
    x, delta = torch.randn(5, 96, dtype=dtype), torch.randn(5, 96, dtype=dtype)
    norm = RMSNorm(96, 1e-6).to(dtype)
    norm.weight.data = torch.randn(96, dtype=dtype)
    residual, out = ext.rms_norm(x, delta, norm.weight, 1e-6)
    assert torch.equal(residual, x + delta)  # the residual add rounds exactly like PyTorch's
    _close(out, norm(x + delta), dtype)
    _, plain = ext.rms_norm(x, EMPTY, norm.weight, 1e-6)  # no residual: the norm alone
    _close(plain, norm(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_and_store_matches_rotary_and_writes_only_its_slots(dtype, qk_norm):
    torch.manual_seed(1)
    heads, kv_heads, dim, tokens, block_size = 4, 2, 16, 6, 4
    rotary = RotaryEmbedding(dim, 64, RopeConfig(theta=10000.0))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    positions = torch.tensor([0, 5, 6, 7, 30, 63])
    slots = torch.tensor([3, 9, 10, 11, 17, 22])  # flat block * block_size + offset
    cache = torch.randn(2, 8, kv_heads, block_size, dim, dtype=dtype)
    before = cache.clone()
    q_norm = RMSNorm(dim, 1e-6).to(dtype)
    k_norm = RMSNorm(dim, 1e-6).to(dtype)
    q_norm.weight.data, k_norm.weight.data = torch.rand(dim, dtype=dtype) + 0.5, torch.rand(dim, dtype=dtype) + 0.5
    q_out = ext.rope_and_store(qkv, positions, slots, rotary.cos, rotary.sin,
                               q_norm.weight if qk_norm else EMPTY, k_norm.weight if qk_norm else EMPTY,
                               1e-6, cache, heads, kv_heads, dim)  # fmt: skip

    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    if qk_norm:
        q, k = q_norm(q), k_norm(k)
    q_ref, k_ref = rotary(positions, q, k)
    if qk_norm:
        _close(q_out, q_ref, dtype)
    else:
        assert torch.equal(q_out, q_ref)  # elementwise: every rounding is PyTorch's
    blocks, offsets = slots // block_size, slots % block_size
    _close(cache[0][blocks, :, offsets], k_ref, dtype)
    assert torch.equal(cache[1][blocks, :, offsets], v)
    untouched = torch.ones(8, block_size, dtype=torch.bool)
    untouched[blocks, offsets] = False
    by_slot = lambda c: c.permute(0, 1, 3, 2, 4)[:, untouched]  # noqa: E731 - [2, slots, kv_heads, dim]
    assert torch.equal(by_slot(cache), by_slot(before))


def _naive_paged_attention(q, cache, tables, seq_index, positions, scale, window):
    """fp64 softmax(q kᵀ · scale) v, one query at a time, over each sequence's keys and values
    gathered once through its block table into [kv_heads, n, D]."""
    block_size, kv_heads = cache.shape[3], cache.shape[2]
    group = q.shape[1] // kv_heads
    gathered = {}
    for s in seq_index.unique().tolist():
        n = int(positions[seq_index == s].max()) + 1
        blocks = tables[s, : -(-n // block_size)]
        gathered[s] = [cache[i][blocks].transpose(0, 1).reshape(kv_heads, -1, cache.shape[4])[:, :n].double()
                       for i in (0, 1)]  # fmt: skip
    out = torch.empty(q.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        last = int(positions[t])
        first = max(0, last - window + 1) if window else 0
        k, v = (x[:, first : last + 1] for x in gathered[int(seq_index[t])])  # [kv_heads, n, D]
        scores = q[t].double().view(kv_heads, group, -1) @ k.transpose(1, 2) * scale  # [kv_heads, group, n]
        out[t] = (torch.softmax(scores, dim=-1) @ v).view(q.shape[1:])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("block_size", [4, 32])  # 32: more keys in one block than a vector has lanes
def test_paged_attention_matches_naive(dtype, window, group, block_size):
    torch.manual_seed(2)
    kv_heads, dim, num_blocks = 2, 32, 40
    cache = torch.randn(2, num_blocks, kv_heads, block_size, dim, dtype=dtype)
    # Three sequences on scattered blocks: a decode at position 20, a prefill chunk of 4 queries at
    # positions 9..12 (each sees only the keys up to itself), and a one-token sequence.
    tables = torch.tensor([[7, 3, 30, 12, 25, 1], [11, 39, 5, 0, 0, 0], [22, 0, 0, 0, 0, 0]])
    seq_index = torch.tensor([0, 1, 1, 1, 1, 2])
    positions = torch.tensor([20, 9, 10, 11, 12, 0])
    q = torch.randn(6, kv_heads * group, dim, dtype=dtype)
    out = ext.paged_attention(q, cache, tables, seq_index, positions, dim**-0.5, window)
    expected = _naive_paged_attention(q, cache, tables, seq_index, positions, dim**-0.5, window)
    _close(out, expected.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [48, 64, 128])
@pytest.mark.parametrize("window", [0, 37])
def test_paged_attention_head_dims_and_partial_chunks(dtype, dim, window):
    """The hand-vectorised kernel's widths (head_dim 64, 128) in every cache dtype, over 16-key
    chunks that start and end mid-block, with decode tokens and a prefill chunk of 19 consecutive
    queries (query tiles of 8, 8 and 3); head_dim 48 takes the generic loop."""
    torch.manual_seed(5)
    kv_heads, group, block_size, num_blocks = 2, 4, 24, 30  # 24: a full and a partial chunk per block
    cache = torch.randn(2, num_blocks, kv_heads, block_size, dim, dtype=dtype)
    tables = torch.randperm(num_blocks)[:24].view(2, 12)
    seq_index = torch.tensor([0, 0, 1, 1, 1] + [1] * 19)
    positions = torch.tensor([100, 283, 0, 15, 47] + list(range(30, 49)))
    q = torch.randn(len(positions), kv_heads * group, dim, dtype=dtype)
    out = ext.paged_attention(q, cache, tables, seq_index, positions, dim**-0.5, window)
    expected = _naive_paged_attention(q, cache, tables, seq_index, positions, dim**-0.5, window)
    _close(out, expected.to(dtype), dtype)


def test_paged_attention_long_context_softmax_is_stable():
    """Large scores (sharp softmax) over 1,000 keys, whole and in 256-key decode chunks: no
    overflow, no NaN."""
    torch.manual_seed(3)
    cache = torch.randn(2, 64, 1, 16, 64) * 4
    tables = torch.arange(64)[None]
    q = torch.randn(2, 1, 64) * 4
    pos, seq = torch.tensor([999, 3 * 256 + 7]), torch.tensor([0, 0])
    expected = _naive_paged_attention(q, cache, tables, seq, pos, 1.0, 0)
    for chunk in (0, 256):
        out = ext.paged_attention(q, cache, tables, seq, pos, 1.0, 0, decode_chunk=chunk)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


# Tolerances against the fp64 reference: fp32 to its own rounding; bf16/fp16 within one step of
# the output's final rounding.
_TIGHT = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 1e-6), torch.float16: (2**-10, 1e-6)}


def _paged_batch(lengths, kv_heads, block_size, dim, dtype):
    """A cache and block table for sequences of these lengths, each on scattered blocks."""
    per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(per_seq) + 3
    cache = torch.randn(2, num_blocks, kv_heads, block_size, dim).to(dtype)
    order = torch.randperm(num_blocks)
    tables = torch.zeros(len(lengths), max(per_seq), dtype=torch.long)
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[start : start + n]
        start += n
    return cache, tables


def _one_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) with torch (and so the kernels) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_paged_attention_splits_long_decodes_into_chunks_and_merges_them(dtype, dim, group):
    """Flash decoding: a decode token with more keys than the chunk is split into chunks (work
    items of their own) whose results are merged by their softmax maxima and sums. One call mixes
    three chunks and a ragged tail, exactly one and two chunks, one key past a chunk, a short
    decode, a prefill of 11 queries over more than two chunks' keys (tiles of 8 and 3, never split)
    and a first token; 24-key blocks put chunk boundaries inside blocks. Sharp scores (q x 3) make
    each chunk's maximum matter. Unsplit (a chunk longer than any context), every item runs its
    online softmax over several key tiles. The result does not depend on how threads share items."""
    torch.manual_seed(6)
    chunk, kv_heads, block_size = 256, 2, 24
    decodes = [3 * chunk + 36, chunk - 1, chunk, 2 * chunk - 1, 5]
    prefill = list(range(2 * chunk + 100, 2 * chunk + 111))
    cache, tables = _paged_batch([p + 1 for p in decodes] + [prefill[-1] + 1, 1], kv_heads, block_size, dim, dtype)
    positions = torch.tensor(decodes + prefill + [0])
    seq_index = torch.tensor(list(range(len(decodes))) + [len(decodes)] * len(prefill) + [len(decodes) + 1])
    q = (torch.randn(len(positions), kv_heads * group, dim) * 3).to(dtype)
    args = (q, cache, tables, seq_index, positions, dim**-0.5, 0)
    expected = _naive_paged_attention(*args)
    rtol, atol = _TIGHT[dtype]
    for forced in (chunk, 1 << 20):
        out = ext.paged_attention(*args, decode_chunk=forced)
        torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
        assert torch.equal(_one_thread(ext.paged_attention, *args, decode_chunk=forced), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [123, 250, 441])
def test_paged_attention_sliding_window_across_decode_chunks(dtype, window):
    """Sliding windows shorter than a 200-key chunk (one item) and longer (split): the first chunk
    then starts mid-chunk and mid-block, and chunk boundaries fall inside 16-key groups. Decodes end
    on, just past and well past chunk boundaries; a prefill tile's queries start their windows at
    different keys."""
    torch.manual_seed(7)
    chunk, kv_heads, group, dim, block_size = 200, 3, 3, 64, 16
    decodes = [3 * chunk + 36, 3 * chunk, 2 * chunk - 1, window - 1, window, 20]
    prefill = list(range(3 * chunk - 5, 3 * chunk + 6))
    cache, tables = _paged_batch([p + 1 for p in decodes] + [prefill[-1] + 1], kv_heads, block_size, dim, dtype)
    positions = torch.tensor(decodes + prefill)
    seq_index = torch.tensor(list(range(len(decodes))) + [len(decodes)] * len(prefill))
    q = (torch.randn(len(positions), kv_heads * group, dim) * 3).to(dtype)
    args = (q, cache, tables, seq_index, positions, dim**-0.5, window)
    out = ext.paged_attention(*args, decode_chunk=chunk)
    rtol, atol = _TIGHT[dtype]
    torch.testing.assert_close(out.double(), _naive_paged_attention(*args), rtol=rtol, atol=atol)


def test_paged_attention_chunks_a_lone_long_decode_for_the_threads():
    """Left to choose, the kernel splits one long decode among the threads (and not at all when
    alone): the same attention either way, to fp32 rounding."""
    torch.manual_seed(8)
    cache, tables = _paged_batch([3000], 2, 16, 64, torch.float32)
    q, pos, seq = torch.randn(1, 6, 64), torch.tensor([2999]), torch.tensor([0])
    args = (q, cache, tables, seq, pos, 0.125, 0)
    expected = _naive_paged_attention(*args)
    for out in (ext.paged_attention(*args), _one_thread(ext.paged_attention, *args)):
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(dtype):
    torch.manual_seed(4)
    gate_up = torch.randn(7, 2 * 100, dtype=dtype) * 6  # wide range: exp's tails included
    gate, up = gate_up.split(100, dim=-1)
    _close(ext.silu_and_mul(gate_up), F.silu(gate) * up, dtype)


def test_engine_falls_back_to_the_modules_when_the_build_fails(tiny_models, monkeypatch, caplog):
    """No compiler (or a failed build): a warning, then the same greedy outputs from the modules."""
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(8, count=3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    fast = LLM(model=str(tiny_models["llama"]), dtype="float32", num_blocks=64)
    assert fast.engine.core.runner.cpu_forward is not None
    expected = [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)]

    cpu_kernels.load_extension.cache_clear()
    monkeypatch.setattr("torch.utils.cpp_extension.verify_ninja_availability",
                        lambda: (_ for _ in ()).throw(RuntimeError("ninja is required")))
    try:
        with caplog.at_level(logging.WARNING, logger="kvflow.model.cpu_kernels"):
            llm = LLM(model=str(tiny_models["llama"]), dtype="float32", num_blocks=64)
        assert llm.engine.core.runner.cpu_forward is None
        assert "unavailable" in caplog.text and "ninja is required" in caplog.text
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    finally:
        cpu_kernels.load_extension.cache_clear()  # the next caller gets the real build back


def test_build_folder_changes_with_an_included_header(tmp_path, monkeypatch):
    """The cache key covers the headers beside the source (cpu_attention.h), not only the .cpp."""
    for path in cpu_kernels.CSRC.glob("cpu_*"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(cpu_kernels, "CSRC", tmp_path)
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "cpu_model.cpp")
    base = cpu_kernels.build_dir()
    header = tmp_path / "cpu_attention.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert cpu_kernels.build_dir() != base


def test_build_folder_changes_with_source_flags_and_cpu(monkeypatch):
    base = cpu_kernels.build_dir()
    monkeypatch.setattr(cpu_kernels, "CFLAGS", [*cpu_kernels.CFLAGS, "-DX"])
    flagged = cpu_kernels.build_dir()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : sse2")
    assert len({base, flagged, cpu_kernels.build_dir()}) == 3


def test_long_prefill_chunks_take_the_modules_and_decodes_the_cpp_forward(tiny_models, monkeypatch):
    """A step with a chunk over CPU_FORWARD_MAX_CHUNK tokens runs the modules; both paths share the
    KV cache, so the C++ decodes that follow see the modules' keys and values (fp32: same tokens)."""
    from kvflow.worker import model_runner as runner_mod

    monkeypatch.setattr(runner_mod, "CPU_FORWARD_MAX_CHUNK", 64)  # the real limit is past this model's context
    prompt = [(7 * i) % 400 + 3 for i in range(runner_mod.CPU_FORWARD_MAX_CHUNK + 40)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain = LLM(model=str(tiny_models["llama"]), dtype="float32", num_blocks=128, cpu_kernels=False)
    expected = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids

    calls = {"cpp": 0}
    honest = cpu_kernels.CpuForward.__call__

    def counting(self, *args, **kwargs):
        calls["cpp"] += 1
        return honest(self, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.CpuForward, "__call__", counting)
    llm = LLM(model=str(tiny_models["llama"]), dtype="float32", num_blocks=128, enable_chunked_prefill=False)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == expected
    assert calls["cpp"] == 5  # the 5 decode steps; the prefill step went to the modules


needs_gemv = pytest.mark.skipif(ext is None or not ext.has_decode_gemv, reason="the build has no AVX512-BF16 GEMV")


@needs_gemv
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_decode_linear_matches_an_fp32_reference(rows, with_bias):
    from kvflow.model.linear import block_rows

    torch.manual_seed(rows)
    x = torch.randn(rows, 96).bfloat16()
    w = torch.randn(40, 96).bfloat16()
    bias = torch.randn(40).bfloat16() if with_bias else EMPTY
    expected = x.float() @ w.float().t() + (bias.float() if with_bias else 0)
    got = ext.decode_linear(x, block_rows(w), bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 40)
    _close(got, expected.bfloat16(), torch.bfloat16)
    # Most outputs round exactly as the reference; the rest are one bf16 step away (summation order).
    assert (got == expected.bfloat16()).float().mean() > 0.8


def test_block_rows_lays_out_four_rows_as_one_stream_or_refuses():
    from kvflow.model.linear import block_rows

    w = torch.arange(8 * 64, dtype=torch.float32).reshape(8, 64).bfloat16()
    b = block_rows(w)
    assert b.shape == (2, 2, 4, 32)
    assert torch.equal(b[1, 0, 2], w[6, :32]) and torch.equal(b[0, 1, 3], w[3, 32:])
    assert block_rows(torch.zeros(6, 64).bfloat16()) is None  # rows not a multiple of 4
    assert block_rows(torch.zeros(8, 48).bfloat16()) is None  # columns not a multiple of 32
    assert block_rows(torch.zeros(8, 64)) is None  # fp32 has no bf16 GEMV


@needs_gemv
def test_engine_decodes_with_the_gemv_copies_and_agrees_with_onednn(tiny_models):
    """bf16: the decode copies exist only when asked for; the LM head through the GEMV equals
    oneDNN's to a bf16 step; greedy outputs agree with the oneDNN-only engine (near-ties aside)."""
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(8, count=4)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    runs = {}
    for gemv in (True, False):
        llm = LLM(model=str(tiny_models["llama"]), dtype="bfloat16", num_blocks=64, decode_gemv=gemv)
        runner = llm.engine.core.runner
        has_copy = runner.model.layers[0].mlp.gate_up_proj.blocked_weight is not None
        assert has_copy == gemv and (runner.cpu_forward._head.decode_copy is not None) == gemv
        runs[gemv] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if gemv:
            hidden = torch.randn(3, runner.model.config.hidden_size).bfloat16()
            _close(runner.cpu_forward.logits(hidden), runner.model.compute_logits(hidden), torch.bfloat16)
    same = sum(a == b for x, y in zip(runs[True], runs[False]) for a, b in zip(x, y))
    assert same >= 0.75 * sum(len(x) for x in runs[True])


# ----------------------------------------------------------------------------- int8 KV cache
def _int8_cache(num_blocks, kv_heads, block_size, dim, spread=1.0):
    """(codes, scales) of random keys and values, quantised by the PyTorch reference."""
    from kvflow.attention.kv_quant import quantize_int8

    return quantize_int8(torch.randn(2, num_blocks, kv_heads, block_size, dim) * spread)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_and_store_int8_quantises_like_the_reference(dtype, qk_norm):
    """Into an int8 cache the kernel stores exactly quantize_int8 of what it stores densely."""
    from kvflow.attention.kv_quant import quantize_int8

    torch.manual_seed(1)
    heads, kv_heads, dim, tokens, block_size = 4, 2, 64, 6, 4
    rotary = RotaryEmbedding(dim, 64, RopeConfig(theta=10000.0))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    positions = torch.tensor([0, 5, 6, 7, 30, 63])
    slots = torch.tensor([3, 9, 10, 11, 17, 22])
    norm = (torch.rand(dim, dtype=dtype) + 0.5) if qk_norm else EMPTY
    dense = torch.zeros(2, 8, kv_heads, block_size, dim, dtype=dtype)
    q_dense = ext.rope_and_store(qkv, positions, slots, rotary.cos, rotary.sin, norm, norm, 1e-6, dense, heads,
                                 kv_heads, dim)
    codes, scales = _int8_cache(8, kv_heads, block_size, dim)
    codes_before, scales_before = codes.clone(), scales.clone()
    q_int8 = ext.rope_and_store(qkv, positions, slots, rotary.cos, rotary.sin, norm, norm, 1e-6, codes, heads,
                                kv_heads, dim, kv_scales=scales)
    assert torch.equal(q_int8, q_dense)
    blocks, offsets = slots // block_size, slots % block_size
    for half in (0, 1):
        ref_codes, ref_scales = quantize_int8(dense[half][blocks, :, offsets])
        assert torch.equal(codes[half][blocks, :, offsets], ref_codes)
        assert torch.equal(scales[half][blocks, :, offsets], ref_scales)
    written = torch.zeros(8, block_size, dtype=torch.bool)
    written[blocks, offsets] = True
    assert torch.equal(codes.permute(0, 1, 3, 2, 4)[:, ~written], codes_before.permute(0, 1, 3, 2, 4)[:, ~written])
    assert torch.equal(scales.permute(0, 1, 3, 2, 4)[:, ~written], scales_before.permute(0, 1, 3, 2, 4)[:, ~written])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [32, 48, 64, 128])
@pytest.mark.parametrize("window", [0, 37])
def test_paged_attention_int8_matches_fp64_over_dequantised_cache(dtype, dim, window):
    """The vectorised kernel (head_dim 32, 64, 128) and the generic loop (48) read int8 codes and
    scales in place: decode tokens, a 19-query prefill chunk, 16-key chunks starting mid-block,
    GQA, against fp64 attention over codes * scales."""
    torch.manual_seed(5)
    kv_heads, group, block_size, num_blocks = 2, 4, 24, 30
    codes, scales = _int8_cache(num_blocks, kv_heads, block_size, dim, spread=3.0)
    tables = torch.randperm(num_blocks)[:24].view(2, 12)
    seq_index = torch.tensor([0, 0, 1, 1, 1] + [1] * 19)
    positions = torch.tensor([100, 283, 0, 15, 47] + list(range(30, 49)))
    q = torch.randn(len(positions), kv_heads * group, dim, dtype=dtype)
    out = ext.paged_attention(q, codes, tables, seq_index, positions, dim**-0.5, window, kv_scales=scales)
    dequantised = codes.double() * scales.double()
    expected = _naive_paged_attention(q, dequantised, tables, seq_index, positions, dim**-0.5, window)
    _close(out, expected.to(dtype), dtype)


@pytest.mark.parametrize("chunk", [0, 256])
def test_paged_attention_int8_split_decode(chunk):
    """Long int8 decodes, whole and in 256-key chunks merged by log-sum-exp."""
    torch.manual_seed(3)
    codes, scales = _int8_cache(64, 2, 16, 64, spread=4.0)
    tables = torch.randperm(64).view(1, 64)
    q = torch.randn(2, 8, 64) * 4
    pos, seq = torch.tensor([1000, 3 * 256 + 7]), torch.tensor([0, 0])
    expected = _naive_paged_attention(q, codes.double() * scales.double(), tables, seq, pos, 1.0, 0)
    out = ext.paged_attention(q, codes, tables, seq, pos, 1.0, 0, decode_chunk=chunk, kv_scales=scales)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_paged_attention_int8_without_scales_is_refused():
    codes, _ = _int8_cache(4, 1, 16, 64)
    with pytest.raises(RuntimeError, match="fp32 scales"):
        ext.paged_attention(torch.randn(1, 1, 64), codes, torch.arange(4)[None], torch.tensor([0]),
                            torch.tensor([5]), 1.0, 0)


# ----------------------------------------------------------------------------- fp8 KV cache
def _fp8_cache(num_blocks, kv_heads, block_size, dim):
    """Codes covering every finite float8_e4m3fn value (subnormals, both signs, +-448) and
    per-head scales [2, kv_heads, 1]."""
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    picks = finite[torch.randint(len(finite), (2, num_blocks, kv_heads, block_size, dim))]
    head_scales = torch.rand(2, kv_heads, 1) * 0.02 + 0.005
    return picks.view(torch.float8_e4m3fn), head_scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_store_fp8_quantises_like_the_reference(dtype):
    from kvflow.attention.kv_quant import quantize_fp8

    torch.manual_seed(1)
    heads, kv_heads, dim, tokens, block_size = 4, 2, 64, 6, 4
    rotary = RotaryEmbedding(dim, 64, RopeConfig(theta=10000.0))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype) * 3
    positions = torch.tensor([0, 5, 6, 7, 30, 63])
    slots = torch.tensor([3, 9, 10, 11, 17, 22])
    dense = torch.zeros(2, 8, kv_heads, block_size, dim, dtype=dtype)
    ext.rope_and_store(qkv, positions, slots, rotary.cos, rotary.sin, EMPTY, EMPTY, 1e-6, dense, heads, kv_heads, dim)
    codes, head_scales = _fp8_cache(8, kv_heads, block_size, dim)
    head_scales[0, 0] = 0.001  # values beyond 448 * scale saturate
    ext.rope_and_store(qkv, positions, slots, rotary.cos, rotary.sin, EMPTY, EMPTY, 1e-6, codes, heads, kv_heads, dim,
                       kv_scales=head_scales)
    blocks, offsets = slots // block_size, slots % block_size
    for half in (0, 1):
        expected = quantize_fp8(dense[half][blocks, :, offsets], head_scales[half])
        assert torch.equal(codes[half][blocks, :, offsets].view(torch.uint8), expected.view(torch.uint8))
    assert (codes[0][blocks, 0, offsets].float().abs() == 448).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [48, 64, 128])
@pytest.mark.parametrize("window", [0, 37])
def test_paged_attention_fp8_matches_fp64_over_dequantised_cache(dtype, dim, window):
    """The vectorised kernel (64, 128: codes widened in registers) and the generic loop (48) over
    every fp8 value, per-head scales, GQA, decodes and a prefill chunk."""
    torch.manual_seed(6)
    kv_heads, group, block_size, num_blocks = 2, 4, 24, 30
    codes, head_scales = _fp8_cache(num_blocks, kv_heads, block_size, dim)
    tables = torch.randperm(num_blocks)[:24].view(2, 12)
    seq_index = torch.tensor([0, 0, 1, 1, 1] + [1] * 19)
    positions = torch.tensor([100, 283, 0, 15, 47] + list(range(30, 49)))
    q = torch.randn(len(positions), kv_heads * group, dim, dtype=dtype)
    out = ext.paged_attention(q, codes, tables, seq_index, positions, dim**-0.5, window, kv_scales=head_scales)
    dequantised = codes.double() * head_scales.double()[:, None, :, None, :]
    expected = _naive_paged_attention(q, dequantised, tables, seq_index, positions, dim**-0.5, window)
    _close(out, expected.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_store_rounds_like_the_reference_on_telling_rows(dtype):
    """Value rows reach the cache as given, so rows built to expose rounding (ties both ways, zero
    rows, values a few ulps from a tie where reciprocal-times-127 would differ) must quantise to
    exactly quantize_int8's codes and scales."""
    from kvflow.attention.kv_quant import quantize_int8
    from tests.attention.int8_rows import int8_test_rows

    heads = kv_heads = 1
    rows = int8_test_rows(32, dtype)
    tokens = rows.shape[0]
    qkv = torch.cat([torch.randn(tokens, 2 * 32).to(dtype), rows], dim=1)  # q, k, then v = the rows
    rotary = RotaryEmbedding(32, 64, RopeConfig(theta=10000.0))
    codes, scales = _int8_cache(-(-tokens // 4), kv_heads, 4, 32)
    ext.rope_and_store(qkv, torch.zeros(tokens, dtype=torch.long), torch.arange(tokens), rotary.cos, rotary.sin,
                       EMPTY, EMPTY, 1e-6, codes, heads, kv_heads, 32, kv_scales=scales)
    ref_codes, ref_scales = quantize_int8(rows)
    stored = codes[1].reshape(-1, 32)[:tokens], scales[1].reshape(-1, 1)[:tokens]
    assert torch.equal(stored[0], ref_codes) and torch.equal(stored[1], ref_scales)
