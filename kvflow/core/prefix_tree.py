"""Global prefix identification for a batch (BatchLLM, Zheng et al. 2024): which prompts share
which prefix, reduced to the ONE shared level the engine has per request.

The engine shares exactly one prefix per request (its group's, then the request's own suffix), so a
batch's prefix tree — a compressed trie over token ids, one leaf per prompt — must be cut to one
level: every prompt belongs to one group, a group's members share its first ``prefix_len`` tokens,
which are computed once for the group instead of once per member. A group of ``m`` prompts with a
prefix of ``k`` tokens therefore saves ``(m - 1) * k`` tokens of prefill.

**Which groups.** BatchLLM's rule keeps a trie node v as a group (saving ``(n_v - 1) * L_v``) or
splits it into its children (``Σ best(child)``), whichever is larger, bottom-up. That only chooses
among *antichains* (every prompt below a kept node is in its group), and it misses a common shape:
a system prompt shared by all, with large few-shot groups under it and some prompts that share only
the system prompt. Splitting at the system prompt's node wins, and then the stray prompts get
nothing, while a group of the strays at the system prompt's depth would still save ``(s - 1) * L``.
``plan_prefix_groups`` therefore solves the general one-level problem: any partition of the batch
into groups, a group's prefix being its members' common prefix. The DP runs bottom-up over the
trie with, as state, the depth ``a`` of the deepest group opened above a node (0: none): a prompt
not placed in a group below may join that group (+a each); a node may open a group on its own edge
(cost k once, +k per prompt that joins it) — BatchLLM's "keep v" is opening at v with every prompt
below joining, its "split" is the children opening their own. Its result equals a brute-force
maximum over all partitions (tests/core/test_prefix_tree.py) and is never below BatchLLM's.

**Block granularity and the last token.** KV is shared in whole blocks and every prompt must
compute at least its last token itself, so a group's prefix is ``floor(min(L, len - 1) / bs) * bs``
for the shortest member. On a trie edge ending at depth L only two prefix lengths can be optimal:
``floor(L / bs) * bs`` (prompts that go on past L) and ``floor((L - 1) / bs) * bs`` (also prompts
that end at L); shorter ones on the same edge keep the same members and save less.

**Ties** (deterministic): the DP maximises the saving, then minimises the number of groups (so
equal savings keep the shallower, larger group, as BatchLLM splits only when the split saves
strictly more; and a "group" that saves nothing is never made: those prompts are singletons with
prefix length 0); between plans equal in both, the first option in the order "open nothing here",
"open at floor(L)", "open at floor(L - 1)", "open both" wins. Trie children are in token order and
identical prompts keep input order, so equal inputs give equal plans.

Cost: sorting the prompts and the neighbours' longest common prefixes (slice comparisons) build
the trie in O(n log n) comparisons; the DP is O(Σ over nodes of the groups that may be open above),
small for real batches (10,000 prompts x 2,000 tokens in seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefixGroup:
    """Prompts computed with one shared prefix: ``members`` index the batch, in input order."""

    prefix_len: int  # block-rounded tokens shared and computed once (0: a prompt on its own)
    members: tuple[int, ...]


@dataclass(frozen=True)
class PrefixPlan:
    """A one-level prefix plan of a batch and how much of the possible reuse it gets.

    ``logical_prefix_tokens``: Σ over prompts of the tokens each shares with at least one other
    prompt (its longest common prefix with any other, capped at ``len - 1`` and block-rounded).
    ``processed_prefix_tokens``: what this plan computes of those: each group's prefix once, plus
    every member's shared tokens beyond its group's prefix. ``optimal_processed_tokens``: what a
    multi-level tree computes (every distinct trie position of the shared parts once), a lower
    bound for any one-level plan. ``saving_ratio`` is BatchLLM's R_saving,
    ``1 - processed / logical`` (0 when nothing is shared).
    """

    groups: tuple[PrefixGroup, ...]  # every prompt in exactly one group; by first member
    logical_prefix_tokens: int
    processed_prefix_tokens: int
    optimal_processed_tokens: int
    saving_ratio: float
    optimal_saving_ratio: float
    block_size: int = 1

    @property
    def saved_tokens(self) -> int:
        """Prefill tokens this plan saves against computing every prompt whole."""
        return self.logical_prefix_tokens - self.processed_prefix_tokens

    def group_of(self) -> list[int]:
        """Per prompt (input order), the index of its group in ``groups``."""
        out = [0] * sum(len(g.members) for g in self.groups)
        for gi, g in enumerate(self.groups):
            for m in g.members:
                out[m] = gi
        return out

    def order(self) -> list[int]:
        """The batch's indices group by group (groups by first member, members in input order)."""
        return [m for g in self.groups for m in g.members]


@dataclass(eq=False)
class _Node:
    """A trie node: the path from the root spells the first ``depth`` tokens of its prompts."""

    depth: int
    children: list[_Node] = field(default_factory=list)  # in token order
    ends: list[int] = field(default_factory=list)  # prompts that end here (identical ones), input order


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (slice comparisons run in C; bisect on a mismatch)."""
    m = min(len(a), len(b))
    if m == 0 or a[0] != b[0]:
        return 0
    if a[:m] == b[:m]:
        return m
    lo, hi = 1, m  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _build(seqs: list[list[int]]) -> tuple[_Node, list[int]]:
    """The compressed trie of ``seqs`` and each prompt's longest common prefix with any other.

    Sorted order puts prompts sharing a prefix next to each other, so neighbours' LCPs define the
    trie (as for a suffix tree from an LCP array): a stack holds the current root-to-leaf path.
    """
    order = sorted(range(len(seqs)), key=seqs.__getitem__)  # stable: identical prompts in input order
    root = _Node(0)
    stack = [root]
    best = [0] * len(seqs)
    prev: list[int] | None = None
    prev_idx = -1
    for idx in order:
        s = seqs[idx]
        h = 0 if prev is None else _lcp(prev, s)
        if prev is not None:
            best[idx] = max(best[idx], h)
            best[prev_idx] = max(best[prev_idx], h)
        last = None
        while stack[-1].depth > h:
            last = stack.pop()
            if stack[-1].depth >= h:
                stack[-1].children.append(last)
        if stack[-1].depth < h:  # the branch point lies inside the popped edge: split it
            mid = _Node(h, children=[last] if last is not None else [])
            stack.append(mid)
        if len(s) == h:  # identical to the previous prompt (a prefix sorts before its extensions)
            stack[-1].ends.append(idx)
        else:
            stack.append(_Node(len(s), ends=[idx]))
        prev, prev_idx = s, idx
    while len(stack) > 1:
        last = stack.pop()
        stack[-1].children.append(last)
    return root, best


def _postorder(root: _Node) -> list[tuple[_Node, _Node | None]]:
    """(node, parent) pairs, children before parents (iterative: tries can be deep)."""
    out: list[tuple[_Node, _Node | None]] = []
    todo: list[tuple[_Node, _Node | None]] = [(root, None)]
    while todo:
        node, parent = todo.pop()
        out.append((node, parent))
        todo.extend((c, node) for c in node.children)
    out.reverse()
    return out


# DP decisions at a node.
_NONE, _FULL, _MINUS, _BOTH = 0, 1, 2, 3


def plan_prefix_groups(prompts: Sequence[Sequence[int]], block_size: int = 1) -> PrefixPlan:
    """Group ``prompts`` (token ids) by shared prefix for the most prefill reuse at one level.

    See the module docstring for the rule, the block rounding and the ties. ``block_size``: the
    KV block size; prefixes are whole blocks and never a whole prompt.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    bs = block_size
    seqs = [p if type(p) is list else list(p) for p in prompts]
    n = len(seqs)
    root, lcp = _build(seqs)
    shared = [max(0, min(h, len(s) - 1)) // bs * bs for h, s in zip(lcp, seqs)]
    post = _postorder(root)

    def rnd(x: int) -> int:
        return max(0, x) // bs * bs

    # Values are saving * M - groups: the saving first, then the fewest groups.
    M = n + 1
    # Candidate group prefix lengths on each node's edge (L_parent, L]: "full" for prompts going
    # on past L, "minus" (< full) for every prompt below, including those ending at L.
    full: dict[int, int] = {}
    minus: dict[int, int] = {}
    # ancestors' open depths of each node: A(child) = A(node) + node's candidates
    depths: dict[int, list[int]] = {id(root): [0]}
    for node, parent in reversed(post):  # top-down
        lp = parent.depth if parent is not None else 0
        kf = rnd(node.depth) if parent is not None else 0
        km = rnd(node.depth - 1) if parent is not None else 0
        full[id(node)] = kf if kf > lp else 0
        minus[id(node)] = km if lp < km < kf else 0
        if parent is not None:
            p = id(parent)
            depths[id(node)] = depths[p] + [k for k in (minus[p], full[p]) if k]
            # (a node's candidates lie on its own edge, deeper than every ancestor's: still sorted)

    value: dict[int, list[int]] = {}
    decision: dict[int, list[int]] = {}
    for node, _parent in post:  # bottom-up
        key = id(node)
        A = depths[key]
        kf, km, t, L = full[key], minus[key], len(node.ends), node.depth
        width = len(A) + (kf > 0) + (km > 0)
        child_sum = [0] * width
        for c in node.children:
            cv = value.pop(id(c))
            for i in range(width):
                child_sum[i] += cv[i]
        # index of each candidate in the children's depth lists (A + [full?, minus?] sorted)
        extra = sorted(k for k in (kf, km) if k)
        pos = {k: len(A) + j for j, k in enumerate(extra)}
        opts_const: list[tuple[int, int]] = []  # (decision, value independent of a)
        if km:
            opts_const.append((_MINUS, -(km * M + 1) + t * km * M + child_sum[pos[km]]))
            if kf:
                opts_const.append((_BOTH, -(km * M + 1) - (kf * M + 1) + t * km * M + child_sum[pos[kf]]))
        vals, decs = [], []
        for i, a in enumerate(A):
            best_v, best_d = t * a * M + child_sum[i], _NONE
            if kf:
                tk = kf if kf <= L - 1 else a  # prompts ending at L cannot share all L tokens
                v = -(kf * M + 1) + t * tk * M + child_sum[pos[kf]]
                if v > best_v:
                    best_v, best_d = v, _FULL
            for d, v in opts_const:
                if v > best_v:
                    best_v, best_d = v, d
            vals.append(best_v)
            decs.append(best_d)
        value[key] = vals
        decision[key] = decs

    # Top-down: follow the decisions from the root with no group open (a = 0, index 0).
    members: dict[int, list[int]] = {}  # group prefix position (node id, k) -> prompts
    prefix_of: dict[int, int] = {}
    group_key: dict[int, tuple[int, int] | None] = {}
    todo: list[tuple[_Node, int, tuple[int, int] | None]] = [(root, 0, None)]
    while todo:
        node, i, open_group = todo.pop()
        key = id(node)
        A = depths[key]
        kf, km, d = full[key], minus[key], decision[key][i]
        extra = sorted(k for k in (kf, km) if k)
        pos = {k: len(A) + j for j, k in enumerate(extra)}
        g_full = (key, kf) if d in (_FULL, _BOTH) else None
        g_minus = (key, km) if d in (_MINUS, _BOTH) else None
        if d == _NONE:
            child_i, child_g, end_g = i, open_group, open_group
        elif d == _FULL:
            child_i, child_g = pos[kf], g_full
            end_g = g_full if kf <= node.depth - 1 else open_group
        elif d == _MINUS:
            child_i, child_g, end_g = pos[km], g_minus, g_minus
        else:
            child_i, child_g, end_g = pos[kf], g_full, g_minus
        for idx in node.ends:
            group_key[idx] = end_g
        for c in node.children:
            todo.append((c, child_i, child_g))
    for idx in range(n):
        g = group_key[idx]
        if g is not None:
            members.setdefault(g, []).append(idx)  # type: ignore[arg-type]
            prefix_of[idx] = g[1]
    groups: list[PrefixGroup] = []
    for g, ms in members.items():
        assert len(ms) >= 2, "the DP never opens a group that saves nothing"
        groups.append(PrefixGroup(g[1], tuple(ms)))
    groups += [PrefixGroup(0, (idx,)) for idx in range(n) if group_key[idx] is None]
    groups.sort(key=lambda g: g.members[0])

    logical = sum(shared)
    processed = sum(g.prefix_len for g in groups if len(g.members) > 1) + sum(
        shared[idx] - prefix_of.get(idx, 0) for idx in range(n)
    )
    # Multi-level optimum: every trie position on some prompt's shared part, once.
    reach: dict[int, int] = {}  # deepest shared depth below each node
    optimal = 0
    for node, parent in post:
        r = max([shared[idx] for idx in node.ends] + [reach.pop(id(c)) for c in node.children], default=0)
        reach[id(node)] = r
        if parent is not None:
            optimal += max(0, min(node.depth, r) - parent.depth)
    return PrefixPlan(
        groups=tuple(groups),
        logical_prefix_tokens=logical,
        processed_prefix_tokens=processed,
        optimal_processed_tokens=optimal,
        saving_ratio=1 - processed / logical if logical else 0.0,
        optimal_saving_ratio=1 - optimal / logical if logical else 0.0,
        block_size=bs,
    )
