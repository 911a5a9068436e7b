"""Global prefix identification (kvflow/core/prefix_tree.py): the trie, the one-level DP against
brute force over every partition of small batches, the reuse figures and the ties."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator, Sequence

import pytest

from kvflow.core.prefix_tree import PrefixGroup, _build, _Node, plan_prefix_groups


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every set partition of ``items`` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def _group_prefix(prompts: list[list[int]], members: Sequence[int], bs: int) -> int:
    """The usable shared prefix of a group: common prefix, capped at len - 1, whole blocks."""
    common = min(_lcp(prompts[members[0]], prompts[m]) for m in members)
    cap = min(len(prompts[m]) for m in members) - 1
    return max(0, min(common, cap)) // bs * bs


def _brute_force(prompts: list[list[int]], bs: int, groups_allowed=None) -> tuple[int, int]:
    """(max saving, fewest real groups at that saving) over every partition of the batch.

    A real group has >= 2 members and a non-zero prefix; ``groups_allowed(members)`` restricts
    which groups of >= 2 members a partition may use (None: any)."""
    best: tuple[int, int] | None = None
    for part in _partitions(list(range(len(prompts)))):
        saving, real = 0, 0
        ok = True
        for g in part:
            if len(g) < 2:
                continue
            if groups_allowed is not None and not groups_allowed(g):
                ok = False
                break
            k = _group_prefix(prompts, g, bs)
            saving += (len(g) - 1) * k
            real += k > 0
        if ok and (best is None or (saving, -real) > (best[0], -best[1])):
            best = (saving, real)
    assert best is not None
    return best


def _subtree_sets(prompts: list[list[int]]) -> set[frozenset[int]]:
    """Groups an antichain cut of the trie can make: all prompts below a node, or identical copies."""
    out = set()
    for p in prompts:
        for d in range(len(p) + 1):
            out.add(frozenset(j for j, q in enumerate(prompts) if q[:d] == p[:d]))
        out.add(frozenset(j for j, q in enumerate(prompts) if q == p))
    return out


def _check_plan(prompts: list[list[int]], bs: int) -> None:
    """The plan is a partition whose groups really share their prefixes, and its figures add up."""
    plan = plan_prefix_groups(prompts, bs)
    seen = sorted(m for g in plan.groups for m in g.members)
    assert seen == list(range(len(prompts)))
    saving = 0
    for g in plan.groups:
        assert list(g.members) == sorted(g.members)
        if len(g.members) == 1:
            assert g.prefix_len == 0
            continue
        assert g.prefix_len > 0 and g.prefix_len % bs == 0
        assert g.prefix_len <= _group_prefix(prompts, g.members, bs)
        saving += (len(g.members) - 1) * g.prefix_len
    assert plan.saved_tokens == saving
    assert plan.optimal_processed_tokens <= plan.processed_prefix_tokens <= plan.logical_prefix_tokens
    best, fewest = _brute_force(prompts, bs)
    assert saving == best, (prompts, bs, plan)
    assert sum(len(g.members) > 1 for g in plan.groups) == fewest


def _random_batch(rng: random.Random, n: int, alphabet: int, max_len: int) -> list[list[int]]:
    return [[rng.randrange(alphabet) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def test_trie_matches_naive_prefixes() -> None:
    """Nodes are exactly the root, every prompt's end and every branch point; the LCPs are right."""
    rng = random.Random(0)
    for _ in range(200):
        prompts = _random_batch(rng, rng.randint(1, 8), 2, 6)
        root, lcp = _build(prompts)
        nodes: list[tuple[int, ...]] = []
        todo: list[tuple[_Node, tuple[int, ...] | None]] = [(root, None)]
        while todo:
            node, parent_path = todo.pop()
            below = []
            stack = [node]
            while stack:
                x = stack.pop()
                below += x.ends
                stack += x.children
            path = tuple(prompts[below[0]][: node.depth])
            assert all(tuple(prompts[i][: node.depth]) == path for i in below)
            assert parent_path is None or (len(path) > len(parent_path) and path[: len(parent_path)] == parent_path)
            assert all(len(prompts[i]) == node.depth for i in node.ends) and node.ends == sorted(node.ends)
            nodes.append(path)
            heads = [c_path for c_path in (tuple(prompts[_first(c)][: node.depth + 1]) for c in node.children)]
            assert heads == sorted(heads) and len(set(heads)) == len(heads)  # token order, no duplicates
            todo += [(c, path) for c in node.children]
        expected = {()} | {tuple(p) for p in prompts}
        for p in prompts:
            for d in range(len(p)):
                nexts = {tuple(q[: d + 1]) for q in prompts if q[:d] == p[:d]}
                ends = any(q == p[:d] for q in prompts)
                if len(nexts) + ends >= 2:
                    expected.add(tuple(p[:d]))
        assert sorted(nodes) == sorted(expected)
        for i, p in enumerate(prompts):
            assert lcp[i] == max([_lcp(p, q) for j, q in enumerate(prompts) if j != i], default=0)


def _first(node: _Node) -> int:
    while not node.ends:
        node = node.children[0]
    return node.ends[0]


@pytest.mark.parametrize("bs", [1, 2, 3])
def test_dp_equals_brute_force_over_every_partition(bs: int) -> None:
    """Small alphabets and lengths make prompts share, nest and repeat a lot."""
    rng = random.Random(bs)
    for trial in range(150):
        n = rng.randint(1, 6 if trial % 5 else 7)
        _check_plan(_random_batch(rng, n, rng.choice([2, 3]), rng.choice([4, 7])), bs)


def test_dp_beats_the_antichain_cut_where_strays_share_the_system_prompt() -> None:
    """BatchLLM's keep-or-split over antichains leaves prompts that share only the system prompt
    alone once the few-shot groups under it are split off; grouping the strays saves more.

    system = 4 tokens; two groups of 3 sharing 10 tokens; two strays sharing only the 4:
    antichain best = max(keep: 7*4 = 28, split: 2*10 + 2*10 = 40) = 40; the plan: 40 + 1*4 = 44.
    """
    system = [1, 2, 3, 4]
    g1 = [system + [5, 6, 7, 8, 9, 10, 100 + i] for i in range(3)]
    g2 = [system + [11, 12, 13, 14, 15, 16, 200 + i] for i in range(3)]
    strays = [system + [20, 300], system + [21, 301]]
    prompts = [g1[0], strays[0], g2[0], g1[1], g2[1], strays[1], g1[2], g2[2]]
    plan = plan_prefix_groups(prompts)
    allowed = _subtree_sets(prompts)
    antichain, _ = _brute_force(prompts, 1, lambda g: frozenset(g) in allowed)
    assert antichain == 40
    assert plan.saved_tokens == 44 == _brute_force(prompts, 1)[0]
    assert plan.groups == (PrefixGroup(10, (0, 3, 6)), PrefixGroup(4, (1, 5)), PrefixGroup(10, (2, 4, 7)))


def test_dp_is_never_below_the_antichain_cut() -> None:
    rng = random.Random(7)
    for _ in range(60):
        prompts = _random_batch(rng, rng.randint(2, 6), 2, 6)
        allowed = _subtree_sets(prompts)
        antichain, _ = _brute_force(prompts, 1, lambda g, allowed=allowed: frozenset(g) in allowed)
        assert plan_prefix_groups(prompts).saved_tokens >= antichain


def test_saving_ratio_by_hand() -> None:
    """Five prompts (block size 1)::

        P0 = 1 2 3 4 5    P3 = 1 2 3 4 5 (identical)    P1 = 1 2 3 4 6    P2 = 1 2 3 7    P4 = 9 9

    Shared with some other prompt, capped at len - 1: P0 4 (5 with P3, capped), P3 4, P1 4, P2 3,
    P4 0 -> logical = 15. One level: {P0..P3} at 3 saves 3*3 = 9; {P0,P1,P3} at 4 saves 2*4 = 8
    (P2 alone); {P0,P3} at 4 + {P1,P2} at 3 saves 4 + 3 = 7. The plan takes 9: it computes 1 2 3
    once plus the 4th token of P0, P1 and P3 each: processed = 3 + 3 = 6, R_saving = 1 - 6/15 = 0.6.
    A multi-level tree computes 1 2 3 4 once: optimal = 4, 1 - 4/15 = 11/15.
    Block size 2: shared P0 4, P3 4, P1 4, P2 2 -> 14; {P0,P1,P3} at 4 (8) beats all at 2 (3*2 = 6):
    processed = 4 + P2's 2 = 6, R = 1 - 6/14; optimal still 4.
    """
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7], [1, 2, 3, 4, 5], [9, 9]]
    plan = plan_prefix_groups(prompts)
    assert plan.groups == (PrefixGroup(3, (0, 1, 2, 3)), PrefixGroup(0, (4,)))
    assert (plan.logical_prefix_tokens, plan.processed_prefix_tokens, plan.optimal_processed_tokens) == (15, 6, 4)
    assert plan.saving_ratio == pytest.approx(0.6) and plan.optimal_saving_ratio == pytest.approx(11 / 15)
    plan2 = plan_prefix_groups(prompts, block_size=2)
    assert plan2.groups == (PrefixGroup(4, (0, 1, 3)), PrefixGroup(0, (2,)), PrefixGroup(0, (4,)))
    assert (plan2.logical_prefix_tokens, plan2.processed_prefix_tokens, plan2.optimal_processed_tokens) == (14, 6, 4)
    assert plan2.saving_ratio == pytest.approx(1 - 6 / 14)


def test_identical_nested_and_disjoint_prompts() -> None:
    same = [[5, 6, 7, 8]] * 4
    plan = plan_prefix_groups(same)
    assert plan.groups == (PrefixGroup(3, (0, 1, 2, 3)),)  # never the whole prompt: 3 of 4 tokens
    assert plan.saving_ratio == pytest.approx(1 - 3 / 12) and plan.optimal_saving_ratio == plan.saving_ratio
    # nested: each prompt extends the previous one; the shortest caps a group at its len - 1
    nested = [[1, 2, 3, 4, 5, 6], [1, 2], [1, 2, 3, 4]]
    plan = plan_prefix_groups(nested)
    assert plan.groups == (PrefixGroup(3, (0, 2)), PrefixGroup(0, (1,)))  # 1*3 (capped) beats 2*1
    disjoint = [[1, 2, 3], [4, 5, 6], [7], [8, 9]]
    plan = plan_prefix_groups(disjoint)
    assert plan.groups == tuple(PrefixGroup(0, (i,)) for i in range(4))
    assert plan.logical_prefix_tokens == plan.processed_prefix_tokens == 0 and plan.saving_ratio == 0.0
    assert plan_prefix_groups([]).groups == ()
    singles = plan_prefix_groups([[1], [1], []]).groups  # one-token prompts share nothing
    assert singles == (PrefixGroup(0, (0,)), PrefixGroup(0, (1,)), PrefixGroup(0, (2,)))


def test_block_rounding() -> None:
    """Prefixes are whole blocks: 7 shared tokens are 4 with blocks of 4, nothing with blocks of 8."""
    prompts = [list(range(7)) + [100 + i, 7] for i in range(3)]
    assert plan_prefix_groups(prompts, 1).groups == (PrefixGroup(7, (0, 1, 2)),)
    assert plan_prefix_groups(prompts, 4).groups == (PrefixGroup(4, (0, 1, 2)),)
    plan8 = plan_prefix_groups(prompts, 8)
    assert all(g.prefix_len == 0 for g in plan8.groups) and plan8.logical_prefix_tokens == 0
    # a prompt of exactly one block cannot share it (its last token is computed by itself)
    assert plan_prefix_groups([[1, 2, 3, 4], [1, 2, 3, 4, 5]], 4).groups[0].prefix_len == 0
    with pytest.raises(ValueError):
        plan_prefix_groups(prompts, 0)


def test_ties_keep_the_shallower_larger_group() -> None:
    """keep = 3*4 = 12 equals split = 1*6 + 1*6: one group of four, not two of two."""
    base = [1, 2, 3, 4]
    prompts = [base + [5, 6, 1], base + [7, 8, 2], base + [5, 6, 3], base + [7, 8, 4]]
    plan = plan_prefix_groups(prompts)
    assert plan.groups == (PrefixGroup(4, (0, 1, 2, 3)),)
    assert plan.saved_tokens == 12


def test_deterministic_and_input_order_kept() -> None:
    rng = random.Random(3)
    prefixes = [[rng.randrange(1000) for _ in range(20)] for _ in range(5)]
    prompts = [prefixes[i % 5] + [rng.randrange(1000) for _ in range(5)] for i in range(40)]
    rng.shuffle(prompts)
    plan = plan_prefix_groups(prompts)
    assert plan == plan_prefix_groups(prompts) == plan_prefix_groups([tuple(p) for p in prompts])
    assert [sorted(g.members) == list(g.members) for g in plan.groups] == [True] * 5
    assert [g.members[0] for g in plan.groups] == sorted(g.members[0] for g in plan.groups)
    assert sorted(plan.order()) == list(range(40))
    assert all(prompts[m][:20] == prompts[g.members[0]][:20] for g in plan.groups for m in g.members)
    assert {g.prefix_len for g in plan.groups} == {20}
    assert plan.group_of()[plan.groups[2].members[-1]] == 2


def test_optimum_is_at_least_the_plan() -> None:
    rng = random.Random(11)
    for _ in range(100):
        prompts = _random_batch(rng, rng.randint(2, 12), 3, 8)
        for bs in (1, 2):
            plan = plan_prefix_groups(prompts, bs)
            assert plan.optimal_saving_ratio >= plan.saving_ratio - 1e-12
            assert plan.processed_prefix_tokens == plan.logical_prefix_tokens - plan.saved_tokens


def test_large_batch_is_fast() -> None:
    """2,000 prompts x 1,000 tokens in 64 groups (a tenth of 10,000 x 2,000) in well under seconds."""
    rng = random.Random(0)
    shared = [[rng.randrange(50000) for _ in range(900)] for _ in range(64)]
    prompts = [shared[i % 64] + [rng.randrange(50000) for _ in range(100)] for i in range(2000)]
    rng.shuffle(prompts)
    start = time.perf_counter()
    plan = plan_prefix_groups(prompts, 16)
    elapsed = time.perf_counter() - start
    assert len(plan.groups) == 64 and {g.prefix_len for g in plan.groups} == {896}
    assert elapsed < 5.0


def test_every_small_batch_over_a_binary_alphabet() -> None:
    """Exhaustive for three prompts of length 1..3 over {0, 1}: every shape of nesting and repeats."""
    words = [list(w) for n in range(1, 4) for w in itertools.product([0, 1], repeat=n)]
    rng = random.Random(5)
    for _ in range(300):
        _check_plan([rng.choice(words) for _ in range(3)], rng.choice([1, 2]))
