"""Shared-prefix attention (BatchLLM): which decodes of a step read the same leading KV blocks.

With prefix caching, requests that share a prompt prefix point at the same physical blocks at the
start of their block tables. A decode step would read those blocks once per sequence; the attention
kernels (csrc/cpu_attention.h, triton/decode.py) can instead read them once for a whole group,
with every member's query heads as rows of one tile, attend each member's own keys separately and
merge the two parts by their log-sum-exp, as they already merge a split decode's chunks.

This module alone decides the groups, once per step (step_inputs.paged_step_inputs), for both
kernels. The rule, deterministic and cheap (it walks only the blocks decodes share):

- Candidates are the step's decodes (the first `num_decodes` sequences, one query token each).
  A shared block must lie wholly before a member's query position (P * block_size <= seq_len - 1),
  so that every shared key is visible to every member and the shared part needs no mask.
- Decodes are partitioned by their first block id; a part of two or more shares its longest
  common run of block ids, P blocks. Members that also share block P (two or more with the same id
  there) are taken out as groups of their own, recursively, when that reads fewer blocks: they read
  their longer run once, the rest share the P blocks (the cost counted is blocks read: a group's
  shared blocks once, plus each member's own).
- A group shares at least one block (one already saves (members - 1) * block_size key and value
  rows per kv head and layer, more than sharing adds per member: a partial result of H rows to
  write and merge) and has at most MAX_GROUP_MEMBERS members (larger ones are cut into
  near-equal consecutive groups).
- Sliding-window attention gets no groups: a window would hide part of the shared run from some
  members.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Most members per group: the C++ kernel keeps a group's members x group-size query rows (scores
#: of a 256-key tile, running sums) in one thread's scratch, and the Triton kernel in one program's
#: registers and shared memory; 16 members already divide the shared reads by 16. The tile's rows
#: are capped too (MAX_GROUP_ROWS), so a large GQA group takes fewer members (`max_members`).
MAX_GROUP_MEMBERS = 16
#: Most rows of a group's tile (members x query heads per kv head): the Triton kernel's fp32 tile of
#: 128 rows x head_dim 128 needs more shared memory than an A100 or H100 has (compile_check), 64 fit.
MAX_GROUP_ROWS = 64


def max_members(query_heads_per_kv: int) -> int:
    """Members per group for a model with this GQA group size (at least 2: a group of one shares nothing)."""
    return max(2, min(MAX_GROUP_MEMBERS, MAX_GROUP_ROWS // max(1, query_heads_per_kv)))


@dataclass(frozen=True)
class SharedPrefixGroups:
    """A step's shared-prefix groups, as both kernels take them (CSR style).

    Group g's members are `members[groups[g, 0]:groups[g, 1]]` (decode sequence indices, which are
    also their query tokens' flat indices: decodes come first, one token each); they all share
    their first `groups[g, 2]` physical blocks."""

    groups: torch.Tensor  # [G, 3] int64: (first member, end of members, shared blocks)
    members: torch.Tensor  # [N] int64
    max_members: int  # the largest group's size (the Triton kernel's tile height)
    max_shared_blocks: int  # the longest shared run (the Triton kernel's split count, without a device sync)

    @property
    def num_groups(self) -> int:
        return self.groups.shape[0]


#: On a GPU, the fewest tokens of reads a step's groups must save (Σ (members − 1) · shared tokens) for the
#: Triton kernel to take them. Measured on one H200 (bf16, 32/8 heads of 128, groups of 16, docs/benchmarks.md
#: "BatchLLM"): the split decode without groups reads the cache at 1.4-2.7 TB/s, and the grouped kernel
#: was slower at 61,440 tokens saved (0.44x, 0.60x) and faster at 245,760 (1.14x). The CPU kernel gains
#: from any group (its reads are not what it waits on least), so no floor there.
GPU_MIN_SAVED_TOKENS = 160_000


def find_shared_prefixes(block_ids: Sequence[Sequence[int]], seq_lens: Sequence[int], num_decodes: int,
                         block_size: int, device: torch.device | str = "cpu",
                         sliding_window: int | None = None, query_heads_per_kv: int = 1,
                         min_saved_tokens: int = 0) -> SharedPrefixGroups | None:
    """The groups of this step's decodes that share leading blocks (module docstring), or None
    where there are none, where they would save fewer than `min_saved_tokens` tokens of reads, or where
    a sliding window is in use."""
    if sliding_window:
        return None
    # Whole blocks before each decode's query position: the most it can share.
    limits = [min(len(block_ids[i]), (seq_lens[i] - 1) // block_size) for i in range(num_decodes)]
    by_first: dict[int, list[int]] = {}
    for i in range(num_decodes):
        if limits[i] >= 1:
            by_first.setdefault(block_ids[i][0], []).append(i)
    found: list[tuple[list[int], int]] = []
    for candidates in by_first.values():
        if len(candidates) > 1:
            found.extend(_best_groups(candidates, 0, block_ids, limits, seq_lens, block_size)[1])
    limit = max_members(query_heads_per_kv)
    groups = [(part, shared) for members, shared in found for part in _cut(members, limit)]
    if not groups or sum((len(m) - 1) * shared for m, shared in groups) * block_size < min_saved_tokens:
        return None
    rows, flat = [], []
    for members, shared in groups:
        rows.append((len(flat), len(flat) + len(members), shared))
        flat.extend(members)
    return SharedPrefixGroups(torch.tensor(rows, dtype=torch.long, device=device),
                              torch.tensor(flat, dtype=torch.long, device=device),
                              max(len(m) for m, _ in groups), max(p for _, p in groups))


def _best_groups(members: list[int], depth: int, block_ids: Sequence[Sequence[int]], limits: list[int],
                 seq_lens: Sequence[int], block_size: int) -> tuple[int, list[tuple[list[int], int]]]:
    """(blocks read, groups) for `members`, which all share blocks [0, depth]: one group over their
    longest common run of P blocks; or each set of two or more that also share block P taken out
    (recursively, as its own best groups) and the rest, if two or more, one group over the P blocks.
    Whichever reads fewer blocks; a tie keeps one group (fewer partial results to merge)."""
    own = {i: -(-seq_lens[i] // block_size) for i in members}  # blocks each member reads alone
    first = block_ids[members[0]]
    shared = depth + 1
    while all(shared < limits[i] and block_ids[i][shared] == first[shared] for i in members):
        shared += 1
    by_next: dict[int, list[int]] = {}
    rest: list[int] = []
    for i in members:
        if shared < limits[i]:
            by_next.setdefault(block_ids[i][shared], []).append(i)
        else:
            rest.append(i)
    split_cost, split_groups = 0, []
    for part in by_next.values():
        if len(part) == 1:
            rest.extend(part)
            continue
        cost, groups = _best_groups(part, shared, block_ids, limits, seq_lens, block_size)
        split_cost += cost
        split_groups.extend(groups)
    whole = _group_cost(members, shared, own)
    if len(rest) == len(members) or split_cost + _group_cost(rest, shared, own) >= whole:
        return whole, [(members, shared)]
    if len(rest) > 1:
        split_groups.append((sorted(rest), shared))
    return split_cost + _group_cost(rest, shared, own), split_groups


def _group_cost(members: list[int], shared: int, own: dict[int, int]) -> int:
    """Blocks read by these members as one group over `shared` blocks (alone: all their own)."""
    if len(members) < 2:
        return sum(own[i] for i in members)
    return shared + sum(own[i] - shared for i in members)


def _cut(members: list[int], limit: int = MAX_GROUP_MEMBERS) -> list[list[int]]:
    """A group cut into near-equal consecutive parts of at most `limit` members (each >= 2)."""
    parts = -(-len(members) // limit)
    size, extra = divmod(len(members), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        out.append(members[start:end])
        start = end
    return out
