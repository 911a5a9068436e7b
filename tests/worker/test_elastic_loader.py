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
