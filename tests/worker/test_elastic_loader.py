"""ElasticLoader (kvflow/worker/retrieval_keys.py): a step's SpeContext buffer moves, layer by layer, on a
worker thread where a CPU core is spare and before the forward where none is; either way each layer's
cache ends as one indexed copy of the moves makes it, and `wait(layer)` returns only once that layer is done."""

from __future__ import annotations

import pytest
import torch

from kvflow.worker import retrieval_keys
from kvflow.worker.retrieval_keys import ElasticLoader, StepMoves


def _caches(layers: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 6, 2, 4, 8, generator=g) for _ in range(layers)]  # [2, blocks, KVH, bs, width]


MOVES = StepMoves(heads=torch.tensor([0, 1, 1]), src_block=torch.tensor([1, 2, 3]), src_offset=torch.tensor([0, 3, 1]),
                  dst_block=torch.tensor([5, 5, 4]), dst_offset=torch.tensor([2, 0, 3]))


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "thread"])
def test_each_layer_gets_the_moves(overlap):
    caches, expected = _caches(), _caches()
    for cache in expected:
        cache[:, MOVES.dst_block, MOVES.heads, MOVES.dst_offset] = cache[:, MOVES.src_block, MOVES.heads,
                                                                          MOVES.src_offset]
    loader = ElasticLoader(torch.device("cpu"), overlap=overlap)
    try:
        loads = loader.start(caches, MOVES)
        if not overlap:
            assert all(event.is_set() for event in loads.done)  # done before the forward starts
        for layer in range(len(caches)):
            loads.wait(layer)
            assert torch.equal(caches[layer], expected[layer])
        loads.wait_all()
    finally:
        loader.close()


def test_the_thread_is_used_only_where_a_core_is_spare(monkeypatch):
    monkeypatch.setattr(retrieval_keys.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not retrieval_keys.spare_cpu_core()
    assert ElasticLoader(torch.device("cpu"))._pool is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert retrieval_keys.spare_cpu_core()
    loader = ElasticLoader(torch.device("cpu"))
    assert loader._pool is not None
    loader.close()


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "thread"])
def test_moves_read_the_tier_where_their_source_went_and_the_offloads_follow(tmp_path, overlap):
    """--kv-resident-memory: a move whose source block's layer is in the offload tier reads it there (the
    pool's copy is poisoned here to prove it), and after the moves the step's offloads put exactly the
    set difference (new blocks of the layers already out, every older block of the layers leaving now)
    into the tier. The buffer then equals a fresh gather of the original KV."""
    from kvflow.attention.kv_spec import KVCacheSpec
    from kvflow.worker.kv_residency import ReleasableCache, SpillTier
    from kvflow.worker.retrieval_keys import Offload

    cache = ReleasableCache(KVCacheSpec.dense(3, 2, 8, 4, torch.float32), 6)
    for layer, original in enumerate(_caches()):
        cache.caches[layer].copy_(original)
    original = _caches()
    tier = SpillTier(cache, str(tmp_path))
    for layer in (1, 2):  # before the step: layers [1, 3) of the table's first 2 blocks (1 and 2) are out
        tier.spill(layer, [1, 2])
        cache.caches[layer][:, 1:3] = float("nan")
    table = [1, 2, 3, 0]
    tier_from = torch.where(MOVES.src_block < 3, 1, torch.iinfo(torch.long).max)  # blocks 1, 2 at table 0, 1
    moves = StepMoves(MOVES.heads, MOVES.src_block, MOVES.src_offset, MOVES.dst_block, MOVES.dst_offset, tier_from,
                      [Offload(tier_layer=1, tier_blocks=2, offload_layer=0, offload_blocks=3, table=table)])
    loader = ElasticLoader(torch.device("cpu"), overlap=overlap, tier=tier)
    try:
        loads = loader.start(cache.caches, moves)
        loads.wait_all()
    finally:
        loader.close()
    for layer in range(3):
        got = cache.caches[layer][:, MOVES.dst_block, MOVES.heads, MOVES.dst_offset]
        want = original[layer][:, MOVES.src_block, MOVES.heads, MOVES.src_offset]
        assert torch.equal(got, want), layer
        twin = tier.parts(layer)[0]
        assert torch.equal(twin[:, 1:4], original[layer][:, 1:4]), layer  # layer 0: 1-3 now; layers 1-2: 3 now
        assert not twin[:, [0, 4, 5]].any()
    assert tier.read_tokens == 2 * 2  # two moves from blocks 1-2, in layers 1 and 2
    assert tier.spilled_bytes == (3 + 1 + 1 + 2 + 2) * 2 * 2 * 4 * 8 * 4  # (the setup's 2 + 2 blocks included)
