"""KIVI on the C++ CPU forward (kvflow/csrc/cpu_kivi.h): attention reading the 4- and 2-bit blocks in
place against an fp64 reference over the dequantised cache and against kivi.kivi_attention; the store
against kivi.store_kivi, code for code; and the engine's greedy tokens against the PyTorch modules."""

from __future__ import annotations

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.attention.kivi import KIVI_GROUP, KiviStep, dequantize_blocks, kivi_attention, store_kivi
from kvflow.model import cpu_kernels
from kvflow.model.cpu_kernels import kivi_step_tensors
from tests.model_utils import make_tiny_model

ext = cpu_kernels.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="no C++ compiler: the engine runs the PyTorch modules")
BF16_ULP = 2**-7

# Chunks (start, n, prefix floor) with a residual window R = 64 (ring W = 96) and blocks of 32 or 64:
# a decode whose ring holds 76 tokens; a chunk starting mid-group whose step quantises a group from
# the ring; a chunk longer than the ring (its writes wrap) whose groups come from ring and step; a
# fresh prompt; a prefix hit (Q = the floor, an empty ring); and a decode whose floor lies below Q.
CHUNKS = [(300, 301, 0), (150, 190, 0), (100, 260, 0), (0, 45, 0), (128, 140, 128), (200, 201, 64)]
RESIDUAL = 64


def _scenario(chunks, bits, block_size, kv_heads, dim, heads, dtype, seed=0, residual=RESIDUAL):
    """A step of `chunks` over a random KIVI cache (codes, meta, ring as a step before left them, in
    the layout kv_spec allocates), its queries and own k, v, and its KiviStep."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for _, n, _ in chunks]
    num_blocks = sum(per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for nb in per_seq:
        tables.append(perm[used:used + nb] + [0] * (max(per_seq) - nb))
        used += nb
    slots = list(range(len(chunks)))
    window = residual + KIVI_GROUP
    codes = torch.randint(0, 256, (2, num_blocks, kv_heads, block_size, dim * bits // 8), generator=gen,
                          dtype=torch.uint8)
    meta = torch.empty(2, num_blocks, kv_heads, block_size, dim // 16, dtype=torch.float16)
    keys_meta = meta[0].view(num_blocks, kv_heads, block_size // KIVI_GROUP, 2, dim)
    keys_meta[:, :, :, 0] = (torch.rand(num_blocks, kv_heads, block_size // KIVI_GROUP, dim, generator=gen)
                             * 0.3 / (1 << bits) + 0.01).half()
    keys_meta[:, :, :, 1] = (torch.rand(num_blocks, kv_heads, block_size // KIVI_GROUP, dim, generator=gen)
                             * -1.0).half()
    values_meta = meta[1].view(num_blocks, kv_heads, block_size, 2, dim // 32)
    values_meta[:, :, :, 0] = (torch.rand(num_blocks, kv_heads, block_size, dim // 32, generator=gen)
                               * 0.3 / (1 << bits) + 0.01).half()
    values_meta[:, :, :, 1] = (torch.rand(num_blocks, kv_heads, block_size, dim // 32, generator=gen) * -1.0).half()
    ring = torch.randn(2, len(chunks), kv_heads, window, dim, generator=gen).to(dtype)
    lens = [n - s for s, n, _ in chunks]
    query_start = [0]
    for n in lens:
        query_start.append(query_start[-1] + n)
    tokens = query_start[-1]
    q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    step = KiviStep.build(bits, residual, block_size, slots, [s for s, _, _ in chunks], [n for _, n, _ in chunks],
                          [f for _, _, f in chunks], query_start, tables, torch.device("cpu"))
    seq_index = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(lens))
    positions = torch.cat([torch.arange(s, n) for s, n, _ in chunks])
    return dict(q=q, k=k, v=v, cache=(codes, meta, ring), step=step, tables=torch.tensor(tables),
                seq_index=seq_index, positions=positions, query_start=query_start, lens=lens)


def _fp64_reference(sc, scale, window):
    """fp64 softmax over each query's context as kivi.py defines it: blocks [0, Q) dequantised
    (dequantize_blocks, fp32), the ring [Q, start), the chunk's own k, v up to the query."""
    codes, meta, ring = sc["cache"]
    step, q, tables = sc["step"], sc["q"], sc["tables"]
    kv_heads, dim = codes.shape[2], ring.shape[-1]
    group = q.shape[1] // kv_heads
    bs = codes.shape[3]
    deq = [dequantize_blocks(codes[h][tables], meta[h][tables], step.bits, h)  # [B, nb, KVH, bs, D]
           .transpose(1, 2).reshape(tables.shape[0], kv_heads, -1, dim).double() for h in (0, 1)]
    assert deq[0].shape[2] == tables.shape[1] * bs
    context = {}  # per sequence, keys and values [KVH, n, D] of positions [0, n)
    for s, (lo, hi) in enumerate(zip(sc["query_start"][:-1], sc["query_start"][1:])):
        start, quantised, slot = int(step.starts[s]), int(step.quantised[s]), int(step.slots[s])
        ring_index = torch.arange(quantised, start) % step.window
        context[s] = [torch.cat([deq[h][s, :, :quantised], ring[h][slot][:, ring_index].double(),
                                 x[lo:hi].transpose(0, 1).double()], dim=1)
                      for h, x in ((0, sc["k"]), (1, sc["v"]))]
    out = torch.empty(q.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        s, p = int(sc["seq_index"][t]), int(sc["positions"][t])
        first = max(0, p - window + 1) if window else 0
        keys, values = (c[:, first:p + 1] for c in context[s])
        scores = q[t].double().view(kv_heads, group, dim) @ keys.transpose(1, 2) * scale
        out[t] = (torch.softmax(scores, dim=-1) @ values).view(q.shape[1:])
    return out


def _run(sc, scale, window, decode_chunk=0):
    codes, meta, ring = sc["cache"]
    return ext.kivi_attention(sc["q"], codes, meta, ring, sc["k"], sc["v"], sc["tables"], sc["seq_index"],
                              sc["positions"], kivi_step_tensors(sc["step"], sc["query_start"]), sc["step"].bits,
                              scale, window, decode_chunk)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dim", [32, 64, 128, 96])  # 96: the generic kernel
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (6, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kivi_attention_matches_fp64_over_the_dequantised_cache_and_the_reference(bits, dim, heads, kv_heads, dtype):
    block_size = 32 if dim != 64 else 64
    sc = _scenario(CHUNKS, bits, block_size, kv_heads, dim, heads, dtype, seed=dim + heads)
    scale = dim**-0.5
    out = _run(sc, scale, 0)
    expected = _fp64_reference(sc, scale, 0)
    tol = 1e-5 if dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), rtol=tol, atol=tol)
    # kivi_attention rounds the dequantised cache to the model dtype before attending: bf16 drifts further.
    ref = kivi_attention(sc["q"], sc["k"], sc["v"], sc["cache"], sc["step"], sc["tables"], sc["lens"],
                         sc["query_start"][:-1], scale)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("window", [50, 100])
@pytest.mark.parametrize("dim", [64, 96])
def test_kivi_attention_sliding_window(bits, window, dim):
    sc = _scenario(CHUNKS, bits, 32, 2, dim, 4, torch.float32, seed=7)
    out = _run(sc, dim**-0.5, window)
    torch.testing.assert_close(out.double(), _fp64_reference(sc, dim**-0.5, window), rtol=1e-5, atol=1e-5)
    ref = kivi_attention(sc["q"], sc["k"], sc["v"], sc["cache"], sc["step"], sc["tables"], sc["lens"],
                         sc["query_start"][:-1], dim**-0.5, window)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("decode_chunk", [64, 100, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kivi_long_decodes_split_into_chunks_and_merge(bits, decode_chunk, dtype):
    """Decodes of 700 and 1,000 keys cut into chunks (some mid-group, one straddling Q) and merged."""
    chunks = [(699, 700, 0), (999, 1000, 0), (640, 641, 512)]
    sc = _scenario(chunks, bits, 32, 2, 128, 6, dtype, seed=3)
    out = _run(sc, 128**-0.5, 0, decode_chunk)
    tol = 1e-5 if dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(out.float(), _fp64_reference(sc, 128**-0.5, 0).to(dtype).float(), rtol=tol, atol=tol)


def _telling_kv(tokens, kv_heads, dim, dtype, gen):
    """Rows on a coarse grid (codes land exactly halfway between levels: round half to even decides),
    some constant channels and tokens (scale 0), and plain random ones."""
    x = torch.randn(tokens, kv_heads, dim, generator=gen)
    x[::3] = torch.round(x[::3] * 4) / 4
    x[:, :, :5] = 0.75  # constant channels: a zero key scale
    x[1::7, :, 32:64] = -0.5  # constant value groups: a zero value scale
    return x.to(dtype)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_kivi_store_matches_the_reference_code_for_code(bits, dtype, dim):
    gen = torch.Generator().manual_seed(11)
    sc = _scenario(CHUNKS, bits, 32, 2, dim, 4, dtype, seed=5)
    tokens = sc["q"].shape[0]
    k, v = _telling_kv(tokens, 2, dim, dtype, gen), _telling_kv(tokens, 2, dim, dtype, gen)
    codes, meta, ring = sc["cache"]
    ring[:, :, :, ::4] = torch.round(ring[:, :, :, ::4] * 8) / 8  # ring rows on a grid too
    assert sc["step"].group_from_step.any() and (~sc["step"].group_from_step).any()  # groups from step and ring
    expected = tuple(t.clone() for t in (codes, meta, ring))
    store_kivi(expected, k, v, sc["step"], 32)
    ext.kivi_store(codes, meta, ring, k, v, kivi_step_tensors(sc["step"], sc["query_start"]), bits)
    for name, got, want in zip(("codes", "meta", "ring"), (codes, meta, ring), expected):
        assert torch.equal(got, want), name


def test_kivi_store_with_nothing_to_do_leaves_the_cache():
    sc = _scenario([(10, 11, 0)], 4, 32, 1, 64, 2, torch.float32)  # a decode far below R: one ring write
    codes, meta, ring = sc["cache"]
    before = codes.clone(), meta.clone()
    ext.kivi_store(codes, meta, ring, sc["k"], sc["v"], kivi_step_tensors(sc["step"], sc["query_start"]), 4)
    assert torch.equal(codes, before[0]) and torch.equal(meta, before[1])
    assert torch.equal(ring[0, 0, :, 10], sc["k"][0])


# ---------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / "llama64", head_dim=64,
                           max_position_embeddings=1024)


@pytest.mark.parametrize("fmt", ["kivi4", "kivi2"])
def test_engine_cpp_forward_gives_the_modules_tokens(llama64, fmt, monkeypatch):
    """Greedy tokens of the C++ forward over a KIVI cache equal the PyTorch modules': prompts past
    R + G tokens prefilled in chunks of 64 (groups quantised mid-chunk, from ring and step), a short
    one, decodes past group boundaries; and the C++ forward really ran every step. (fp32: in bf16 the
    two paths round differently and a random tiny model's greedy tokens part ways even over a dense
    cache; the kernels' bf16 accuracy is tested above.)"""
    prompts = [[(7 * i + 3 * j) % 500 + 3 for i in range(n)] for j, n in enumerate((300, 45, 170))]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    kwargs = dict(model=str(llama64), dtype="float32", block_size=32, num_blocks=64, max_num_batched_tokens=64,
                  kv_cache_dtype=fmt)
    plain = LLM(cpu_kernels=False, **kwargs)
    expected = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]
    calls = {"cpp": 0}
    honest = cpu_kernels.CpuForward.__call__

    def counting(self, *args, **kw):
        calls["cpp"] += 1
        return honest(self, *args, **kw)

    monkeypatch.setattr(cpu_kernels.CpuForward, "__call__", counting)
    llm = LLM(**kwargs)
    out = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]
    assert calls["cpp"] > 40
    assert out == expected
