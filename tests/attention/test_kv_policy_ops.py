"""KV-policy tensor work against naive references on the full attention matrix (float64, loops):
Quest's key bounds and block choice, SnapKV's token choice and compaction, H2O's block mass — over
dense, int8 and fp8 caches, with GQA and ragged sequence lengths."""

from __future__ import annotations

import math

import pytest
import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.kv_policy_ops import (
    SNAPKV_POOL_KERNEL,
    allocate_key_bounds,
    block_attention_mass,
    compact_tokens,
    quest_bounds,
    quest_select,
    read_keys,
    snapkv_select,
    update_key_bounds,
)
from kvflow.attention.kv_quant import store_fp8, store_int8
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.attention.torch_native import TorchNativeBackend

BS = 4
FORMATS = ["float32", "int8", "fp8_e4m3"]


def _cache(fmt: str, num_blocks: int, kvh: int, d: int):
    spec = KVCacheSpec.for_format(fmt, 1, kvh, d, BS, torch.float32, 0.05 if fmt == "fp8_e4m3" else None)
    return spec.allocate(num_blocks, "cpu")[0]


def _fill(cache, table: list[int], n: int, kvh: int, d: int, gen: torch.Generator) -> None:
    """Write n random tokens' keys and values into the slots of `table`, in order."""
    k, v = torch.randn(n, kvh, d, generator=gen), torch.randn(n, kvh, d, generator=gen)
    slots = torch.tensor([table[i // BS] * BS + i % BS for i in range(n)])
    sb, so = slots // BS, slots % BS
    if isinstance(cache, torch.Tensor):
        cache[0][sb, :, so], cache[1][sb, :, so] = k, v
    elif cache[0].dtype == torch.int8:
        store_int8(cache, k, v, sb, so)
    else:
        store_fp8(cache, k, v, sb, so)


def _keys(cache, table: list[int], n: int) -> torch.Tensor:
    """The first n keys of a sequence as stored, [kv_heads, n, D] float64 (read block by block)."""
    blocks = read_keys(cache, torch.tensor(table)).double()  # [nb, KVH, bs, D]
    return blocks.transpose(0, 1).reshape(blocks.shape[1], -1, blocks.shape[-1])[:, :n]


def _setup(fmt: str, lens: list[int], kvh: int = 2, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    nb = max(-(-n // BS) for n in lens)
    num_blocks = len(lens) * nb + 6
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [perm[i * nb:(i + 1) * nb] for i in range(len(lens))]
    cache = _cache(fmt, num_blocks, kvh, d)
    for table, n in zip(tables, lens):
        _fill(cache, table, n, kvh, d, gen)
    return cache, tables, gen


# ----------------------------------------------------------------------------------------- Quest
def _folds():
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    return [None] + ([ext.fold_key_bounds] if ext is not None else [])


@pytest.mark.parametrize("fold", _folds(), ids=lambda f: "torch" if f is None else "cpp")
@pytest.mark.parametrize("fmt", FORMATS)
def test_key_bounds_are_min_and_max_of_each_blocks_keys(fmt, fold):
    """Bounds folded in over several steps (a block split across steps, a recycled block starting
    over at offset 0) equal each block's min/max over the keys it holds."""
    cache, tables, _ = _setup(fmt, [13, 7])
    kvh, d = 2, 8
    bounds = allocate_key_bounds(1, cache[0].shape[1] if not isinstance(cache, torch.Tensor) else cache.shape[1],
                                 kvh, d, torch.float32, "cpu")[0]
    bounds.fill_(123.0)  # stale content of a recycled block must not survive
    for table, n in zip(tables, [13, 7]):
        for lo, hi in ((0, 5), (5, 6), (6, n)):  # three steps, the second mid-block
            slots = torch.tensor([table[i // BS] * BS + i % BS for i in range(lo, min(hi, n))])
            if len(slots):
                update_key_bounds([bounds], [cache], slots, BS, fold)
    for table, n in zip(tables, [13, 7]):
        keys = _keys(cache, table, n)
        for b in range(-(-n // BS)):
            chunk = keys[:, b * BS:min(n, (b + 1) * BS)]
            torch.testing.assert_close(bounds[table[b], :, 0].double(), chunk.amin(1))
            torch.testing.assert_close(bounds[table[b], :, 1].double(), chunk.amax(1))


def _naive_quest(q, keys, n, read, sinks, window, scale):
    """Quest's choice for one row from the full key matrix: per head the bound per block, softmaxed,
    summed over heads; sinks and the newest `window` blocks forced; the best `read` in all."""
    h, d = q.shape
    kvh = keys.shape[0]
    nb = -(-n // BS)
    score = [0.0] * nb
    for head in range(h):
        kv = head // (h // kvh)
        ub = []
        for b in range(nb):
            blk = keys[kv, b * BS:min(n, (b + 1) * BS)]
            lo, hi = blk.amin(0), blk.amax(0)
            ub.append(sum(max(q[head, j] * lo[j], q[head, j] * hi[j]) for j in range(d)) * scale)
        m = max(ub)
        z = sum(math.exp(u - m) for u in ub)
        for b in range(nb):
            score[b] += math.exp(ub[b] - m) / z
    forced = {b for b in range(nb) if b < sinks or b >= nb - max(window, 1)}
    rest = sorted((b for b in range(nb) if b not in forced), key=lambda b: -score[b])
    chosen = sorted(forced | set(rest[:max(0, min(read, nb) - len(forced))]))
    return chosen


@pytest.mark.parametrize("fmt", FORMATS)
def test_quest_reads_the_blocks_a_naive_quest_chooses(fmt):
    lens = [37, 21, 30]
    cache, tables, gen = _setup(fmt, lens, seed=3)
    kvh, d, h = 2, 8, 4
    bounds = allocate_key_bounds(1, len(lens) * 10 + 6, kvh, d, torch.float32, "cpu")[0]
    for table, n in zip(tables, lens):
        update_key_bounds([bounds], [cache], torch.tensor([table[i // BS] * BS + i % BS for i in range(n)]), BS)
    q = torch.randn(len(lens), h, d, generator=gen)
    read, sinks, window = [4, 3, 5], [1, 0, 1], [1, 2, 1]
    table_t = torch.tensor(tables)
    chosen, new_lens = quest_select(q, bounds, table_t, lens, read, sinks, window, BS, 0.35)
    for r, n in enumerate(lens):
        want = _naive_quest(q[r].double(), _keys(cache, tables[r], n), n, read[r], sinks[r], window[r], 0.35)
        assert chosen[r, :len(want)].tolist() == [tables[r][b] for b in want], f"row {r}"
        fill = n - (-(-n // BS) - 1) * BS
        assert new_lens[r] == (len(want) - 1) * BS + fill


def test_quest_reading_every_block_is_full_attention():
    """A budget covering the whole context reads every block in order: the same table and length."""
    lens = [9, 16]
    cache, tables, gen = _setup("float32", lens, seed=5)
    bounds = allocate_key_bounds(1, 64, 2, 8, torch.float32, "cpu")[0]
    for table, n in zip(tables, lens):
        update_key_bounds([bounds], [cache], torch.tensor([table[i // BS] * BS + i % BS for i in range(n)]), BS)
    chosen, new_lens = quest_select(torch.randn(2, 4, 8, generator=gen), bounds, torch.tensor(tables), lens,
                                    [10, 10], [0, 0], [1, 1], BS, 0.3)
    assert new_lens == lens
    for r, n in enumerate(lens):
        assert chosen[r, :-(-n // BS)].tolist() == tables[r][:-(-n // BS)]


# ---------------------------------------------------------------------------------------- SnapKV
def _naive_snapkv(q_win, keys, n, budget, scale):
    """Per kv head: the window queries' softmax over causal keys, summed over queries, avg-pooled
    (kernel 5, edges averaged over what exists), summed over the group's heads; top budget - W."""
    w, h, _ = q_win.shape
    kvh = keys.shape[0]
    out = []
    for kv in range(kvh):
        votes = [0.0] * (n - w)
        for head in range(kv * (h // kvh), (kv + 1) * (h // kvh)):
            pooled_head = [0.0] * (n - w)
            raw = [0.0] * (n - w)
            for i in range(w):
                pos = n - w + i
                s = [float(q_win[i, head] @ keys[kv, j]) * scale for j in range(pos + 1)]
                m = max(s)
                z = sum(math.exp(x - m) for x in s)
                for j in range(n - w):
                    raw[j] += math.exp(s[j] - m) / z
            half = SNAPKV_POOL_KERNEL // 2
            for j in range(n - w):
                window = raw[max(0, j - half):min(n - w, j + half + 1)]
                pooled_head[j] = sum(window) / len(window)
            votes = [a + b for a, b in zip(votes, pooled_head)]
        keep = sorted(sorted(range(n - w), key=lambda j: -votes[j])[:budget - w]) + list(range(n - w, n))
        out.append(keep)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_snapkv_keeps_what_a_naive_snapkv_keeps_and_copies_it_exactly(fmt):
    n, budget, w = 29, 14, 5
    cache, tables, gen = _setup(fmt, [n], kvh=2, d=8, seed=7)
    q_win = torch.randn(w, 4, 8, generator=gen)
    keep = snapkv_select(q_win, cache, torch.tensor(tables[0]), n, budget, 0.4)
    want = _naive_snapkv(q_win.double(), _keys(cache, tables[0], n), n, budget, 0.4)
    assert keep.tolist() == want
    num_blocks = (cache if isinstance(cache, torch.Tensor) else cache[0]).shape[1]
    used = set(tables[0])
    dest = torch.tensor([b for b in range(num_blocks) if b not in used][: -(-budget // BS)])
    before = [p.clone() for p in ((cache,) if isinstance(cache, torch.Tensor) else cache)]
    compact_tokens(cache, torch.tensor(tables[0]), keep, dest)
    parts = (cache,) if isinstance(cache, torch.Tensor) else cache
    for part, old in zip(parts, before):
        if part.dim() != 5:  # per-head scales are untouched
            assert torch.equal(part, old)
            continue
        for kv in range(2):
            for j, tok in enumerate(want[kv]):
                src = old[:, tables[0][tok // BS], kv, tok % BS]
                assert torch.equal(part[:, int(dest[j // BS]), kv, j % BS], src)
        assert torch.equal(part[:, tables[0]], old[:, tables[0]]), "the source blocks were written"


# ------------------------------------------------------------------------------------------- H2O
def _naive_mass(q, keys, n, scale):
    h = q.shape[0]
    kvh = keys.shape[0]
    mass = [0.0] * -(-n // BS)
    for head in range(h):
        s = [float(q[head] @ keys[head // (h // kvh), j]) * scale for j in range(n)]
        m = max(s)
        z = sum(math.exp(x - m) for x in s)
        for j in range(n):
            mass[j // BS] += math.exp(s[j] - m) / z
    return mass


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_mass_matches_the_full_attention_matrix_and_the_backend(fmt):
    lens = [11, 24, 6]
    cache, tables, gen = _setup(fmt, lens, seed=11)
    q = torch.randn(3, 4, 8, generator=gen)
    mass = block_attention_mass(q, cache, torch.tensor(tables), lens, 0.3)
    for r, n in enumerate(lens):
        want = _naive_mass(q[r].double(), _keys(cache, tables[r], n), n, 0.3)
        torch.testing.assert_close(mass[r, :len(want)].double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        assert mass[r, len(want):].abs().max() == 0 if mass.shape[1] > len(want) else True
    # The torch-native decode kernel returns the same mass while it attends.
    backend = TorchNativeBackend()
    nb = len(tables[0])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([tables[r][(n - 1) // BS] * BS + (n - 1) % BS for r, n in enumerate(lens)]),
        seq_lens=torch.tensor(lens), query_lens=torch.ones(3, dtype=torch.long),
        query_start_loc=torch.arange(4), block_tables=torch.tensor(tables), num_decodes=3, max_query_len=1,
        max_seq_len=max(lens), block_size=BS, seq_lens_list=lens, query_lens_list=[1, 1, 1],
    )
    backend.prepare(meta)
    meta.extra["block_mass"] = torch.zeros(3, nb)
    backend._decode(q, cache, meta, 0.3, None)
    torch.testing.assert_close(meta.extra["block_mass"], mass, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(8, 4), (6, 1), (4, 2), (8, 8)])
def test_quest_bounds_equal_a_loop_over_heads_and_blocks(num_heads, num_kv_heads):
    """Σ_d max(q_d·min_d, q_d·max_d) per query head and block, by loops, for any GQA shape (the other
    tests' 2 KV heads equal the bounds' min/max axis, which once hid a wrong axis)."""
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    head_dim, blocks, rows, per_row = 16, 12, 2, 5
    bounds = torch.randn(blocks, num_kv_heads, 2, head_dim, generator=gen).sort(dim=2).values
    q = torch.randn(rows, num_heads, head_dim, generator=gen)
    tables = torch.randint(0, blocks, (rows, per_row), generator=gen)
    num_blocks = torch.tensor([per_row, 3])
    got = quest_bounds(q, bounds, tables, num_blocks, 0.5)
    group = num_heads // num_kv_heads
    for r in range(rows):
        for h in range(num_heads):
            for j in range(per_row):
                lo, hi = bounds[tables[r, j], h // group]
                want = 0.5 * torch.maximum(q[r, h] * lo, q[r, h] * hi).sum() if j < num_blocks[r] else -math.inf
                assert math.isclose(float(got[r, h, j]), float(want), rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_quest_bounds_kernel_matches_pytorch(dtype):
    """The C++ CPU kernel the engine and the benchmark use scores blocks as the PyTorch reference does
    (ragged rows, GQA, a head size that is not a multiple of 16)."""
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    if ext is None:
        pytest.skip("no C++ compiler")
    from kvflow.attention.kv_policy_ops import quest_bounds

    gen = torch.Generator().manual_seed(1)
    for head_dim in (64, 40):
        bounds = torch.randn(30, 3, 2, head_dim, generator=gen).sort(dim=2).values.to(dtype)  # 3 KV heads
        q = torch.randn(3, 6, head_dim, generator=gen).to(dtype)
        tables = torch.randint(0, 30, (3, 9), generator=gen)
        num_blocks = torch.tensor([9, 4, 1])
        want = quest_bounds(q, bounds, tables, num_blocks, 0.3)
        got = ext.quest_bounds(q, bounds, tables, num_blocks, 0.3)
        assert torch.isinf(got).equal(torch.isinf(want))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpp_quest_select_chooses_the_blocks_pytorch_chooses():
    """The engine's CPU choice (C++) equals the PyTorch reference's, over ragged rows, sinks and windows."""
    from kvflow.model.cpu_kernels import load_extension, quest_select_cpp

    ext = load_extension()
    if ext is None:
        pytest.skip("no C++ compiler")
    gen = torch.Generator().manual_seed(2)
    bounds = torch.randn(80, 2, 2, 32, generator=gen).sort(dim=2).values
    q = torch.randn(4, 6, 32, generator=gen)
    tables = torch.randperm(80, generator=gen)[:4 * 12].view(4, 12)
    args = ([45, 17, 48, 3], [4, 3, 6, 2], [1, 0, 2, 0], [1, 2, 1, 3], BS, 0.2)
    want_tables, want_lens = quest_select(q, bounds, tables, *args)
    got_tables, got_lens = quest_select_cpp(ext, q, bounds, tables, *args)
    assert got_lens == want_lens
    for r, n in enumerate(want_lens):
        k = -(-n // BS)
        assert got_tables[r, :k].tolist() == want_tables[r, :k].tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_block_mass_reads_the_cache_in_place_like_the_reference(fmt):
    """The C++ forward's H2O mass (codes times scales read in place, no dequantised copy) equals the
    PyTorch reference over dense, int8 and fp8 caches."""
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    if ext is None:
        pytest.skip("no C++ compiler")
    lens = [11, 24, 6]
    cache, tables, gen = _setup(fmt, lens, kvh=2, d=32, seed=13)
    q = torch.randn(3, 4, 32, generator=gen)
    want = block_attention_mass(q, cache, torch.tensor(tables), lens, 0.3)
    parts = (cache,) if isinstance(cache, torch.Tensor) else cache
    got = ext.block_mass(q, parts[0], torch.tensor(tables), torch.tensor(lens), 0.3,
                         kv_scales=parts[1] if len(parts) > 1 else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
