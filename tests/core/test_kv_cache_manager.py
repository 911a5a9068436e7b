"""Block pool and prefix index: reference counts, LRU reuse, verified hits, collision safety."""

from __future__ import annotations

import pytest

from kvflow.core import kv_cache_manager
from kvflow.core.kv_cache_manager import BlockPool, KVCacheManager
from kvflow.core.request import Request
from kvflow.lora_request import AdapterRef
from kvflow.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def compute(kv: KVCacheManager, request: Request) -> None:
    """Pretend the whole request was computed: allocate, advance, index full blocks."""
    assert kv.allocate(request, request.num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)


def test_allocate_and_free_return_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = make_request("a", list(range(10)))
    assert kv.allocate(r, 10)
    assert len(r.block_ids) == 3 and kv.num_free_blocks == 5
    assert not kv.allocate(make_request("b", list(range(40))), 40)  # needs 10 > 5: refused, nothing taken
    assert kv.num_free_blocks == 5
    kv.free(r)
    assert kv.num_free_blocks == 8 and r.block_ids == []
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(12)))
    compute(kv, a)
    assert kv.pool.num_cached == 3
    b = make_request("b", list(range(12)))  # identical prompt: only 2 blocks may hit (last token computed)
    assert kv.match_prefix(b) == 8
    assert b.block_ids == a.block_ids[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in a.block_ids] == [2, 2, 1]
    c = make_request("c", list(range(8)) + [99, 98, 97, 96, 95])
    assert kv.match_prefix(c) == 8
    d = make_request("d", [1] + list(range(1, 12)))
    assert kv.match_prefix(d) == 0
    assert kv.stats.hit_tokens == 16 and kv.stats.queried_tokens == 12 + 13 + 12


def test_freed_cached_blocks_are_reused_lru_and_evicted_last_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a)  # 3 blocks, 2 full and cached
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.pool.num_cached == 2
    # A hit on freed blocks takes them back off the free queue.
    b = make_request("b", [1, 2, 3, 4, 9])
    assert kv.match_prefix(b) == 4
    assert kv.num_free_blocks == 2
    kv.free(b)
    # Filling the pool evicts the cached blocks only once the never-cached free block is used up.
    c = make_request("c", [7, 7, 7, 7, 7, 7, 7, 7])
    assert kv.allocate(c, 8)
    assert kv.pool.num_cached == 0


def test_hash_collision_never_returns_wrong_tokens(monkeypatch):
    monkeypatch.setattr(kv_cache_manager, "hash_block", lambda parent, tokens, salt=None: 42)  # every block collides
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, a)
    b = make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert kv.match_prefix(b) == 0  # same hash, different tokens: verified miss
    c = make_request("c", [1, 2, 3, 4, 9])
    assert kv.match_prefix(c) == 4  # the genuine match is still found


def test_chained_hash_depends_on_the_whole_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 0])
    compute(kv, a)
    b = make_request("b", [9, 9, 3, 4, 0])  # second block equal, first differs
    assert kv.match_prefix(b) == 0


def test_duplicate_content_chains_onto_the_indexed_block():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    a, b = make_request("a", [1, 2, 3, 4, 5]), make_request("b", [1, 2, 3, 4, 5])
    for r in (a, b):  # computed concurrently: neither saw the other's blocks
        assert kv.allocate(r, 5)
    for r in (a, b):
        r.num_computed_tokens = 5
        kv.cache_full_blocks(r)
    assert kv.pool.num_cached == 2
    c = make_request("c", [1, 2, 3, 4, 6])
    assert kv.match_prefix(c) == 4


def test_release_more_than_taken_is_an_error():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.release([block])
    with pytest.raises(RuntimeError):
        pool.release([block])


def test_cache_salt_separates_otherwise_equal_prefixes():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    plain = make_request("plain", list(range(12)))
    compute(kv, plain)
    salted = Request("salted", list(range(12)), SamplingParams(max_tokens=4), cache_salt="tenant-a")
    assert kv.cached_prefix_tokens(salted) == 0 and kv.match_prefix(salted) == 0  # no block of another salt
    compute(kv, salted)
    assert set(salted.block_ids).isdisjoint(plain.block_ids)
    assert salted.block_hashes != plain.block_hashes  # the salt is chained into every block's hash
    same = Request("same", list(range(12)) + [5], SamplingParams(max_tokens=4), cache_salt="tenant-a")
    other = Request("other", list(range(12)) + [5], SamplingParams(max_tokens=4), cache_salt="tenant-b")
    assert kv.cached_prefix_tokens(same) == 12 and kv.match_prefix(same) == 12
    assert same.block_ids == salted.block_ids[:3]
    assert kv.match_prefix(other) == 0
    unsalted = make_request("unsalted", list(range(12)) + [5])
    assert kv.match_prefix(unsalted) == 12 and unsalted.block_ids == plain.block_ids[:3]


def test_salt_is_verified_even_when_hashes_collide(monkeypatch):
    monkeypatch.setattr(kv_cache_manager, "hash_block", lambda parent, tokens, salt=None: 7)  # salt ignored
    kv = KVCacheManager(num_blocks=8, block_size=4)
    salted = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), cache_salt="x")
    compute(kv, salted)
    assert kv.match_prefix(make_request("b", [1, 2, 3, 4, 5])) == 0  # same hash and tokens, another salt


def test_cached_prefix_tokens_takes_and_counts_nothing():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    compute(kv, make_request("a", list(range(10))))
    probe = make_request("probe", list(range(10)) + [3])
    free_before, stats_before = kv.num_free_blocks, (kv.stats.queried_tokens, kv.stats.hit_tokens)
    assert kv.cached_prefix_tokens(probe) == 8
    assert probe.block_ids == [] and probe.num_computed_tokens == 0
    assert kv.num_free_blocks == free_before and (kv.stats.queried_tokens, kv.stats.hit_tokens) == stats_before


def test_kivi_ring_slots_follow_the_requests_that_hold_blocks():
    kv = KVCacheManager(num_blocks=32, block_size=32, residual_slots=2, residual_tokens=64)
    a, b, c = (make_request(r, list(range(40))) for r in "abc")
    assert kv.allocate(a, 40) and kv.allocate(b, 40)
    assert {a.kv_residual_slot, b.kv_residual_slot} == {0, 1} and kv.num_free_residual_slots == 0
    free_blocks = kv.num_free_blocks
    assert not kv.allocate(c, 40)  # no slot left: refused, nothing taken
    assert c.kv_residual_slot is None and c.block_ids == [] and kv.num_free_blocks == free_blocks
    slot = a.kv_residual_slot
    assert kv.allocate(a, 1) and a.kv_residual_slot == slot  # a running request keeps its slot
    kv.free(a)
    assert a.kv_residual_slot is None and kv.num_free_residual_slots == 1
    assert kv.allocate(c, 40) and c.kv_residual_slot == slot
    kv.free(b), kv.free(c)
    assert kv.num_free_residual_slots == 2 and kv.num_free_blocks == 32


def test_kivi_prefix_hit_leaves_out_the_blocks_still_dense():
    """With R = 64 and blocks of 32, a computed prefix's last two full blocks may hold tokens that are
    only in the ring of the request that computed them: a hit stops before them."""
    kv = KVCacheManager(num_blocks=32, block_size=32, residual_slots=4, residual_tokens=64)
    a = make_request("a", list(range(200)))
    compute(kv, a)
    assert kv.pool.num_cached == 6
    b = make_request("b", list(range(200)) + [7])
    assert kv.match_prefix(b) == 4 * 32  # 6 full blocks matched, 2 left out
    assert b.kv_prefix_floor == 128 and b.block_ids == a.block_ids[:4]
    assert kv.cached_prefix_tokens(make_request("c", list(range(100)))) == 32  # 3 blocks match, 1 usable
    short = make_request("d", list(range(70)))
    assert kv.match_prefix(short) == 0 and short.kv_prefix_floor == 0  # 2 blocks: none wholly quantised
    kv.free(b)
    assert b.kv_prefix_floor == 0
    # n > 1 siblings share the same way.
    sibling = make_request("s", list(range(200)))
    assert kv.share_prefix(sibling, a, 6) == 4 * 32


def test_reset_prefix_cache_drops_only_blocks_nobody_holds():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    held = Request("held", [1, 2, 3, 4, 5], SamplingParams())
    done = Request("done", [6, 7, 8, 9, 10], SamplingParams())
    for request in (held, done):
        assert kv.allocate(request, 5)
        request.num_computed_tokens = 5
        kv.cache_full_blocks(request)
    kv.free(done)
    assert kv.reset_prefix_cache() == 2  # done's two full blocks; held's stay indexed
    again = Request("again", [6, 7, 8, 9, 10], SamplingParams())
    assert kv.match_prefix(again) == 0
    twin = Request("twin", [1, 2, 3, 4, 5], SamplingParams())
    assert kv.match_prefix(twin) == 4


# ------------------------------------------------------------ layer groups
def variant_request(rid: str, tokens: list[int], name: str) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), variant=AdapterRef(name, f"/{name}", "d1g3st",
                                                                                   kind="variant"))


def test_layer_groups_take_a_page_per_group_and_give_every_page_back():
    kv = KVCacheManager(num_blocks=12, block_size=4, layer_groups=3)
    r = make_request("a", list(range(10)))
    assert kv.num_token_blocks == 4 and kv.pages_needed(r, 10) == 9
    assert kv.allocate(r, 10)
    tables = [r.block_ids, *(t.block_ids for t in r.kv_groups)]
    assert [len(t) for t in tables] == [3, 3, 3] and len({b for t in tables for b in t}) == 9
    assert kv.num_free_blocks == 3 and kv.pages_needed(r, 13) == 3  # one more block in each group
    assert not kv.allocate(make_request("b", list(range(8))), 8)  # 6 pages > 3 free: refused, nothing taken
    assert kv.num_free_blocks == 3
    kv.free(r)
    assert kv.num_free_blocks == 12 and all(not t.block_ids for t in r.kv_groups) and not r.block_ids


def test_a_variant_shares_the_pages_of_the_groups_below_its_own_layers():
    """Group 0 computes the base's KV in variant `v` (shared_groups 1); group 1 is its own. Its prefix hit covers
    the base's blocks in group 0 only, so it computes from the start and reads (never writes) those pages."""
    v = AdapterRef("v", "/v", "d1g3st", kind="variant")
    kv = KVCacheManager(num_blocks=32, block_size=4, layer_groups=2, shared_groups={v.key: 1})
    base = make_request("base", list(range(13)))
    compute(kv, base)
    assert kv.pool.num_cached == 6  # 3 full blocks in each group
    variant = variant_request("v", list(range(13)), "v")
    assert kv.salt(variant, 0) == kv.salt(base, 0) and kv.salt(variant, 1) != kv.salt(base, 1)
    assert kv.cached_prefix_tokens(variant) == 0  # not in every group: nothing is computed
    assert kv.match_prefix(variant) == 0 and variant.num_computed_tokens == 0
    assert variant.block_ids == base.block_ids[:3] and variant.num_cached_blocks == 3
    assert variant.kv_groups[0].block_ids == [] and variant.kv_groups[0].num_cached_blocks == 0
    assert kv.pages_needed(variant, 13) == 1 + 4  # group 0: its last block; group 1: all four
    compute(kv, variant)
    assert variant.block_ids[:3] == base.block_ids[:3] and len(variant.kv_groups[0].block_ids) == 4
    assert kv.pool.num_cached == 9  # group 1's three blocks of the variant; group 0's were the base's
    # Another request of the base hits both groups; another of the variant too.
    again = make_request("again", list(range(13)))
    assert kv.match_prefix(again) == 12 and again.kv_groups[0].block_ids == base.kv_groups[0].block_ids[:3]
    twin = variant_request("twin", list(range(13)), "v")
    assert kv.match_prefix(twin) == 12 and twin.block_ids == base.block_ids[:3]
    assert twin.kv_groups[0].block_ids == variant.kv_groups[0].block_ids[:3]
    for r in (base, variant, again, twin):
        kv.free(r)
    assert kv.num_free_blocks == 32 and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_layer_groups_trim_keeps_a_groups_prefix_hits_and_pins_span_every_group():
    v = AdapterRef("v", "/v", "d1g3st", kind="variant")
    kv = KVCacheManager(num_blocks=32, block_size=4, layer_groups=2, shared_groups={v.key: 1})
    base = make_request("base", list(range(13)))
    compute(kv, base)
    variant = variant_request("v", list(range(13)), "v")
    kv.match_prefix(variant)
    kv.trim(variant)  # nothing computed, but group 0's hits are the prompt's KV: they stay
    assert variant.block_ids == base.block_ids[:3] and variant.kv_groups[0].block_ids == []
    pinned = kv.pin_prefix(make_request("p", list(range(13))), 2)
    assert pinned == base.block_ids[:2] + base.kv_groups[0].block_ids[:2]
    assert kv.pin_prefix(variant_request("q", list(range(13)), "v"), 1) is None  # group 1 holds none of it
    kv.free(base)
    kv.free(variant)
    kv.unpin(pinned, keep=1)  # past the first block of each group: evicted at once
    assert kv.pool.blocks[pinned[1]].block_hash is None and kv.pool.blocks[pinned[3]].block_hash is None
    assert kv.pool.blocks[pinned[0]].block_hash is not None and kv.pool.blocks[pinned[2]].block_hash is not None
    assert kv.num_free_blocks == 32


def test_policies_that_rewrite_one_table_are_refused_with_layer_groups():
    kv = KVCacheManager(num_blocks=8, block_size=2, layer_groups=2)
    r = make_request("a", list(range(6)))
    compute(kv, r)
    with pytest.raises(RuntimeError, match="one layer group"):
        kv.evict_block(r, 0)
    with pytest.raises(RuntimeError, match="one layer group"):
        kv.replace_blocks(r, 2)
