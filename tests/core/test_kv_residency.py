"""SpeContext's memory model (kvflow/core/kv_residency.py) against a naive recount: every step it takes the
largest threshold whose memory fits the cap (counting every layer of every block ever handed out, less
what each block released), only ever lowers a sequence's threshold, releases only older blocks a sequence
alone holds, and hands the runner exactly the set difference to move."""

from __future__ import annotations

import random
from types import SimpleNamespace

from kvflow.config import KVPolicySettings
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.kv_policy import SpeContextPolicy
from kvflow.core.kv_residency import KVResidency
from kvflow.worker.step import KVPolicyOp

L, BS, WINDOW_BLOCKS = 6, 4, 2
B, R = 1000, 600  # a layer-block's bytes, and what releasing one gives back at least (pages inside it)


def _sequence(kv: KVCacheManager, tokens: int) -> SimpleNamespace:
    policy = SpeContextPolicy(KVPolicySettings("specontext", 16, 0, 4), BS)
    return SimpleNamespace(block_ids=kv.pool.allocate(-(-tokens // BS)), kv_policy=policy, tokens=tokens)


def _chunk(seq: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(request=seq, start=seq.tokens - 1, kv_op=KVPolicyOp("specontext",
                                                                               window_blocks=WINDOW_BLOCKS))


def _naive_memory(kv: KVCacheManager) -> int:
    return sum(L * B - b.released_layers * R for b in kv.pool.blocks)


def _memory_if(kv: KVCacheManager, seqs: list[SimpleNamespace], f: int) -> int:
    """Layer-blocks in memory if every sequence released layers [min(its threshold, f), L) of its older blocks."""
    # (a free block outside the prefix cache gives everything back: nothing reads it again)
    released = {b.block_id: L if b.ref_cnt == 0 and b.block_hash is None else b.released_layers
                for b in kv.pool.blocks}
    for seq in seqs:
        own = L if seq.kv_policy.offload_layer is None else seq.kv_policy.offload_layer
        layer = min(own, f)
        older = -(-seq.tokens // BS) - WINDOW_BLOCKS
        for block in seq.block_ids[:max(0, older)]:
            if kv.pool.blocks[block].ref_cnt > 1:
                break
            released[block] = max(released[block], L - layer)
    return sum(L * B - r * R for r in released.values())


def test_the_threshold_is_the_largest_that_fits_and_only_goes_down():
    rng = random.Random(0)
    kv = KVCacheManager(4096, BS, reuse_first=True)
    model = KVResidency(kv, L, layer_block_bytes=B, cap_bytes=400 * B, release_bytes=R)
    seqs = [_sequence(kv, rng.randrange(40, 120)) for _ in range(4)]
    shared = seqs[0].block_ids[0]
    kv.pool.touch([shared])  # another request holds seq 0's first block: it must stay whole
    thresholds = {id(s): L for s in seqs}
    seen: set[int] = set()
    for step in range(200):
        for seq in seqs:
            seq.tokens += 1
            if -(-seq.tokens // BS) > len(seq.block_ids):
                seq.block_ids += kv.pool.allocate(1)
        if step % 50 == 49:  # a sequence ends and another starts (it reuses the freed blocks)
            done = seqs.pop(rng.randrange(len(seqs)))
            kv.pool.release(list(reversed(done.block_ids)))
            seqs.append(_sequence(kv, rng.randrange(40, 120)))
            thresholds[id(seqs[-1])] = L
        fits = [f for f in range(L + 1) if _memory_if(kv, seqs, f) <= model.cap_bytes]
        want = max(fits) if fits else 0
        seen.add(want)
        chunks = [_chunk(s) for s in seqs]
        before = [(c.request.kv_policy.offload_layer, c.request.kv_policy.offloaded_blocks) for c in chunks]
        model.plan(chunks)
        assert model.threshold == want, step
        assert model.resident_bytes == _naive_memory(kv) == _memory_if(kv, seqs, want)
        if fits:
            assert model.resident_bytes <= model.cap_bytes
        for chunk, (layer, blocks) in zip(chunks, before):
            op, policy = chunk.kv_op, chunk.request.kv_policy
            assert (op.tier_layer, op.tier_blocks) == (L if layer is None else layer, blocks)  # what was out
            new = L if policy.offload_layer is None else policy.offload_layer
            assert (op.offload_layer, op.offload_blocks) == (new, policy.offloaded_blocks)  # what is out after
            assert new <= thresholds[id(chunk.request)]  # never back up
            thresholds[id(chunk.request)] = new
            for block in chunk.request.block_ids[: policy.offloaded_blocks]:
                assert kv.pool.blocks[block].released_layers == L - new
        assert kv.pool.blocks[shared].released_layers == 0 or shared not in seqs[0].block_ids
    assert model.offloaded_bytes > 0
    assert {L, 0} < seen  # all layers while they fit, some, and none (the cap exceeded even then)
    assert model.over_cap_steps > 0


def test_a_released_block_leaves_the_prefix_index_and_comes_back_whole_when_handed_out():
    kv = KVCacheManager(16, BS, reuse_first=True)
    (block,) = kv.pool.allocate(1)
    kv.pool.register(block, 1234, (1, 2, 3, 4), None)
    assert kv.pool.lookup(1234, (1, 2, 3, 4), None) == block
    kv.pool.release_layers(block, 4)
    assert kv.pool.lookup(1234, (1, 2, 3, 4), None) is None  # its KV is no longer whole
    assert kv.pool.released_layers == 4
    kv.pool.release([block])
    assert kv.pool.allocate(1) == [block]  # freed blocks first: the memory touched stays the peak
    assert kv.pool.released_layers == 0 and kv.pool.blocks[block].released_layers == 0


def test_memory_nothing_will_read_goes_back_and_the_prefix_cache_yields_under_the_cap():
    """Freed blocks outside the prefix cache give all their memory back (the runner releases them before
    the next step); cached free blocks keep theirs until the cap needs it, least recently used first."""
    kv = KVCacheManager(64, BS, reuse_first=True)
    model = KVResidency(kv, L, layer_block_bytes=B, cap_bytes=10 * L * B, release_bytes=B)
    cached = kv.pool.allocate(4)
    for i, block in enumerate(cached):
        kv.pool.register(block, 100 + i, (i,) * BS, None)
    private = kv.pool.allocate(4)
    kv.pool.release(list(reversed(cached + private)))
    assert sorted(model.take_released()) == sorted(private)  # unindexed: nothing reads them again
    assert all(kv.pool.blocks[b].released_layers == L for b in private)
    assert model.resident_bytes == 4 * L * B  # the cached four stay
    held = _sequence(kv, 9 * BS)  # the private four first, then 5 never-used blocks: 13 touched, 4 cached
    assert set(private) <= set(held.block_ids) and not set(cached) & set(held.block_ids)
    model.plan([])
    assert model.resident_bytes == model.cap_bytes  # the cache gave way, as much as needed...
    assert model.take_released() == cached[::-1][:3]  # ...least recently used first (freed last-first)
    assert kv.pool.lookup(100, (0,) * BS, None) == cached[0]  # the newest stays cached
