"""Shared-prefix detection (kvflow/attention/shared_prefix.py) on hand-made block tables."""

from __future__ import annotations

import torch

from kvflow.attention.shared_prefix import (
    GPU_MIN_SAVED_TOKENS,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_ROWS,
    SharedPrefixGroups,
    find_shared_prefixes,
    max_members,
)
from kvflow.worker.step_inputs import paged_step_inputs

BS = 4  # block size


def _groups(found: SharedPrefixGroups | None) -> list[tuple[list[int], int]]:
    """(members, shared blocks) per group."""
    if found is None:
        return []
    members = found.members.tolist()
    return [(members[a:b], p) for a, b, p in found.groups.tolist()]


def _lens(tables: list[list[int]], extra: int = 1) -> list[int]:
    """Each sequence filling all its blocks but the last, which holds `extra` tokens."""
    return [(len(t) - 1) * BS + extra for t in tables]


def test_identical_tables_share_every_block_before_the_query():
    """Members with the very same table share the whole blocks before their query position: the last
    block (holding the query) is never shared, nor is a block the query sits in."""
    tables = [[5, 6, 7, 8]] * 3
    found = find_shared_prefixes(tables, [13, 13, 13], 3, BS)  # position 12: block 3 holds it
    assert _groups(found) == [([0, 1, 2], 3)]
    assert found.max_members == 3 and found.max_shared_blocks == 3 and found.num_groups == 1
    # Position 11 (last slot of block 2): blocks 0-1 only are wholly before it.
    assert _groups(find_shared_prefixes(tables, [12, 13, 13], 3, BS)) == [([0, 1, 2], 2)]


def test_nested_tables_split_when_a_subgroup_shares_much_more():
    """Four share 2 blocks; two of them share 10. Splitting reads fewer blocks: the pair keeps its
    10, the rest share 2."""
    long_a = [1, 2] + list(range(100, 108)) + [200]
    long_b = [1, 2] + list(range(100, 108)) + [201]
    short_a, short_b = [1, 2, 30, 31], [1, 2, 40, 41]
    tables = [short_a, long_a, short_b, long_b]
    found = _groups(find_shared_prefixes(tables, _lens(tables), 4, BS))
    assert sorted(found) == [([0, 2], 2), ([1, 3], 10)]


def test_nested_tables_stay_one_group_when_the_split_gains_nothing():
    """Three share 5 blocks, two of them one more: one group of three reads fewer blocks."""
    tables = [[1, 2, 3, 4, 5, 6, 60], [1, 2, 3, 4, 5, 6, 61], [1, 2, 3, 4, 5, 7, 70]]
    assert _groups(find_shared_prefixes(tables, _lens(tables), 3, BS)) == [([0, 1, 2], 5)]


def test_disjoint_tables_and_lone_sequences_have_no_group():
    tables = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert find_shared_prefixes(tables, _lens(tables), 3, BS) is None
    # Two groups by first block; a third sequence alone on its own first block.
    tables = [[1, 2, 3], [1, 2, 4], [9, 10, 11], [9, 10, 12], [20, 21, 22]]
    assert _groups(find_shared_prefixes(tables, _lens(tables), 5, BS)) == [([0, 1], 2), ([2, 3], 2)]


def test_only_decodes_are_grouped():
    """Sequences past num_decodes are prefill chunks: never members."""
    tables = [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    assert _groups(find_shared_prefixes(tables, _lens(tables), 2, BS)) == [([0, 1], 2)]
    assert find_shared_prefixes(tables, _lens(tables), 1, BS) is None


def test_a_member_whose_position_is_inside_the_shared_run_limits_it():
    """The second sequence's query sits in block 1 (position 6): the others share blocks 0-3, but the
    group with it shares only block 0; without it (first block of its own) they share 4."""
    tables = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4, 7]]
    found = _groups(find_shared_prefixes(tables, [17, 7, 17], 3, BS))
    assert found == [([0, 2], 4)]  # splitting off the short one reads fewer blocks
    # At position 3 (inside block 0) it sees no whole block: not a candidate at all.
    assert _groups(find_shared_prefixes(tables, [17, 4, 17], 3, BS)) == [([0, 2], 4)]


def test_a_sliding_window_gets_no_groups():
    tables = [[1, 2, 3]] * 2
    assert find_shared_prefixes(tables, [9, 9], 2, BS, sliding_window=4) is None
    assert find_shared_prefixes(tables, [9, 9], 2, BS, sliding_window=None) is not None


def test_large_groups_are_cut_into_near_equal_parts():
    n = MAX_GROUP_MEMBERS + 3
    tables = [[1, 2, 100 + i] for i in range(n)]
    found = _groups(find_shared_prefixes(tables, _lens(tables), n, BS))
    assert [len(m) for m, _ in found] == [10, 9]
    assert [i for m, _ in found for i in m] == list(range(n)) and {p for _, p in found} == {2}


def test_a_large_gqa_group_takes_fewer_members_per_group():
    """A group's tile is members x query heads per kv head rows, at most MAX_GROUP_ROWS: with 8 query
    heads per kv head, 8 members (the Triton kernel's fp32 tile of 128 rows did not fit shared memory)."""
    n = 12
    tables = [[1, 2, 100 + i] for i in range(n)]
    assert max_members(8) == MAX_GROUP_ROWS // 8 == 8 and max_members(1) == MAX_GROUP_MEMBERS and max_members(64) == 2
    found = _groups(find_shared_prefixes(tables, _lens(tables), n, BS, query_heads_per_kv=8))
    assert [len(m) for m, _ in found] == [6, 6]
    assert [len(m) for m, _ in _groups(find_shared_prefixes(tables, _lens(tables), n, BS))] == [12]


def test_step_inputs_build_groups_only_when_asked():
    """paged_step_inputs stores the groups on the metadata (on the step's device) when asked."""
    tables = [[1, 2, 3], [1, 2, 4], [5, 6]]
    args = ([9, 10, 8], [1, 1, 8], tables, BS, torch.device("cpu"))
    _, _, meta, _ = paged_step_inputs(*args)
    assert meta.shared_prefix is None
    _, _, meta, _ = paged_step_inputs(*args, shared_prefix=True)
    assert _groups(meta.shared_prefix) == [([0, 1], 2)]
    assert meta.shared_prefix.groups.dtype == torch.long and meta.shared_prefix.members.dtype == torch.long
    _, _, meta, _ = paged_step_inputs(*args, shared_prefix=True, sliding_window=8)
    assert meta.shared_prefix is None
    _, _, meta, _ = paged_step_inputs(*args, shared_prefix=True, shared_prefix_min_saved=9)  # saves 2 · 4 = 8
    assert meta.shared_prefix is None


def test_groups_that_save_too_few_reads_are_dropped():
    """`min_saved_tokens`: Σ (members − 1) · shared tokens must reach it (the GPU's floor, GPU_MIN_SAVED_TOKENS);
    the default (the CPU's) takes any group."""
    tables = [[5, 6, 7, 8]] * 3  # three members sharing 3 blocks of 4: 2 · 12 = 24 tokens saved
    assert _groups(find_shared_prefixes(tables, [13, 13, 13], 3, BS, min_saved_tokens=24)) == [([0, 1, 2], 3)]
    assert find_shared_prefixes(tables, [13, 13, 13], 3, BS, min_saved_tokens=25) is None
    assert GPU_MIN_SAVED_TOKENS > 61_440  # both slower cases measured on an H200 saved that many
