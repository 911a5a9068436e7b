"""SpeContext's tensor work against naive references: the retrieval scores and top-K (loops in
float64), elastic loading (exactly the set difference moves; after any sequence of steps the
buffer equals a fresh gather of the selection, over dense, int8 and fp8 caches), and the reduced
table a decode reads."""

from __future__ import annotations

import math

import pytest
import torch

from kvflow.attention.specontext_ops import (
    buffer_moves,
    elastic_plan,
    load_into_buffer,
    reduced_table,
    retrieval_scores,
    select_tokens,
)
from tests.attention.test_kv_policy_ops import BS, _cache, _fill


def test_scores_are_the_max_over_query_heads_of_their_softmax():
    gen = torch.Generator().manual_seed(0)
    kvh, g, d, n = 2, 3, 8, 19
    q, keys = torch.randn(kvh, g, d, generator=gen), torch.randn(n, kvh, d, generator=gen)
    got = retrieval_scores(q, keys, 0.3)
    for h in range(kvh):
        for j in range(n):
            best = 0.0
            for gi in range(g):
                logits = [0.3 * float(q[h, gi].double() @ keys[i, h].double()) for i in range(n)]
                top = max(logits)
                best = max(best, math.exp(logits[j] - top) / sum(math.exp(x - top) for x in logits))
            assert got[h, j].item() == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("k,sinks", [(8, 4), (5, 0), (3, 6), (20, 2)])
def test_selection_is_the_sinks_then_the_best_scored(k, sinks):
    gen = torch.Generator().manual_seed(k + sinks)
    scores = torch.rand(3, 20, generator=gen)
    got = select_tokens(scores, k, sinks)
    for h in range(3):
        forced = list(range(min(sinks, k)))
        rest = sorted((j for j in range(20) if j not in forced), key=lambda j: -scores[h, j].item())
        assert got[h].tolist() == sorted(forced + rest[: k - len(forced)])


def test_selecting_more_than_there_is_is_refused():
    with pytest.raises(ValueError, match="cannot select 9 tokens among 8"):
        select_tokens(torch.rand(1, 8), 9, 0)


def _token(cache, block: int, head: int, offset: int) -> list[torch.Tensor]:
    """Every per-token component of one (block, head, slot), keys and values."""
    parts = (cache,) if isinstance(cache, torch.Tensor) else tuple(cache)
    return [p[:, block, head, offset].clone() for p in parts if p.dim() == 5]


@pytest.mark.parametrize("fmt", ["float32", "int8", "fp8_e4m3"])
def test_elastic_loading_moves_exactly_the_difference_and_the_buffer_equals_a_fresh_gather(fmt):
    gen = torch.Generator().manual_seed(1)
    kvh, d, n, k = 2, 8, 37, 8
    cache = _cache(fmt, 24, kvh, d)
    table = torch.randperm(24, generator=gen)[:10]
    buffer = torch.tensor([b for b in range(24) if b not in table.tolist()][:2])
    _fill(cache, table.tolist(), n, kvh, d, gen)
    held = None
    for step in range(12):
        # Selections that drift: most entries stay, a few change (as SpeContext's do).
        scores = torch.rand(kvh, n, generator=gen) + (torch.arange(n) % (5 + step % 3) == 0).float()
        selected = select_tokens(scores, k, 2)
        heads, slots, entries, contents = elastic_plan(held, selected)
        before = {(h, s): _token(cache, int(buffer[s // BS]), h, s % BS) for h in range(kvh) for s in range(k)}
        load_into_buffer(cache, *buffer_moves(table, heads, slots, entries, buffer, BS))
        for h in range(kvh):
            new = set(selected[h].tolist()) - (set() if held is None else set(held[h].tolist()))
            moved = {int(e) for hh, e in zip(heads.tolist(), entries.tolist()) if hh == h}
            assert moved == new  # exactly the set difference moves
            assert set(contents[h].tolist()) == set(selected[h].tolist())
            for s in range(k):
                got = _token(cache, int(buffer[s // BS]), h, s % BS)
                e = int(contents[h, s])
                want = _token(cache, int(table[e // BS]), h, e % BS)
                assert all(torch.equal(a, b) for a, b in zip(got, want))  # a fresh gather
                if held is not None and int(held[h, s]) == e:  # a slot that kept its token was not written
                    assert all(torch.equal(a, b) for a, b in zip(got, before[(h, s)]))
        held = contents


def test_a_reduced_table_is_the_buffer_then_the_window_blocks():
    table = torch.tensor([7, 3, 9, 1, 4, 8])
    buffer = torch.tensor([11, 12])
    got, length = reduced_table(buffer, table, 22, 2, BS)  # 22 entries: blocks 0..5, the last holds 2
    assert got.tolist() == [11, 12, 4, 8]
    assert length == 2 * BS + (22 - 4 * BS)


def test_rows_planned_together_equal_each_planned_alone():
    """The batched forms (a row dimension, candidates padded to the longest row): scores within fp32
    rounding of each row's own, the same selection, and the same moves and contents as elastic_plan per row."""
    from kvflow.attention.specontext_ops import elastic_rows

    gen = torch.Generator().manual_seed(5)
    kvh, g, d, k = 2, 3, 8, 6
    lengths = [19, 11, 16]
    q = torch.randn(len(lengths), kvh, g, d, generator=gen)
    keys = torch.randn(len(lengths), max(lengths), kvh, d, generator=gen)
    lens = torch.tensor(lengths)
    scores = retrieval_scores(q, keys, 0.3, lens)
    selected = select_tokens(scores, k, 2, lens)
    held = torch.stack([torch.randperm(n, generator=gen)[:k].expand(kvh, k).clone() for n in lengths])
    held[1, 0, :2] = -1  # empty slots
    rows, heads, slots, entries, contents = elastic_rows(held, selected)
    for r, n in enumerate(lengths):
        alone = retrieval_scores(q[r], keys[r, :n], 0.3)
        torch.testing.assert_close(scores[r, :, :n], alone, rtol=1e-6, atol=1e-7)
        assert (scores[r, :, n:] == 0).all()  # padding is out of the softmax
        assert torch.equal(selected[r], select_tokens(alone, k, 2))
        h_alone, s_alone, e_alone, c_alone = elastic_plan(held[r], selected[r])
        mine = rows == r
        assert torch.equal(heads[mine], h_alone) and torch.equal(slots[mine], s_alone)
        assert torch.equal(entries[mine], e_alone) and torch.equal(contents[r], c_alone)
    with pytest.raises(ValueError, match="cannot select 12 tokens among 11"):
        select_tokens(scores, 12, 2, lens)
