"""The runner's side of layer groups: each group's tables and slots against a naive per-token reference (the
scratch page wherever a token's block in that group is a prefix-cache page), the layers' caches aliasing g
tensors, and what keeps an engine to one group."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.config import EngineConfig
from kvflow.core.request import LayerGroupBlocks
from kvflow.worker.kv_layer_groups import allocate_grouped, group_step_tables, layer_groups_blocker


def _chunk(tables: list[list[int]], cached: list[int]) -> SimpleNamespace:
    request = SimpleNamespace(block_ids=tables[0], num_cached_blocks=cached[0],
                              kv_groups=[LayerGroupBlocks(t, [], c) for t, c in zip(tables[1:], cached[1:])])
    return SimpleNamespace(request=request)


def test_group_tables_and_slots_match_a_per_token_reference():
    bs, scratch = 4, 50
    chunks = [_chunk([[1, 2], [3, 4]], [0, 0]),  # a decode at cache index 5
              _chunk([[7, 8, 9, 10], [11, 12, 13]], [3, 0]),  # group 0: the first 3 blocks are cached pages
              _chunk([[20], [21]], [0, 0])]
    positions = [[5], list(range(0, 10)), [0, 1, 2]]
    seq_index = torch.tensor([i for i, p in enumerate(positions) for _ in p])
    kv_positions = torch.tensor([p for ps in positions for p in ps])
    tables, slots = group_step_tables(chunks, 2, kv_positions, seq_index, bs, scratch)
    assert tables.shape == (2, 3, 4)
    assert tables[1, 1].tolist() == [11, 12, 13, 0] and tables[0, 1].tolist() == [7, 8, 9, 10]
    for g in range(2):
        for t, (seq, pos) in enumerate(zip(seq_index.tolist(), kv_positions.tolist())):
            request = chunks[seq].request
            table = request if g == 0 else request.kv_groups[g - 1]
            page = scratch if pos // bs < table.num_cached_blocks else table.block_ids[pos // bs]
            assert slots[g, t] == page * bs + pos % bs, (g, t)
    assert (slots[0] // bs == scratch).sum() == 10  # the second chunk's ten tokens, all in cached blocks
    assert not (slots[1] // bs == scratch).any()


def test_layers_alias_the_groups_tensors():
    spec = KVCacheSpec.dense(6, 2, 8, 4, torch.float32)
    caches = allocate_grouped(spec, 3, 10, torch.device("cpu"))  # 3 groups of 2 layers: 2 tensors of 11 pages
    assert len(caches) == 6 and caches[0].shape[1] == 11
    assert all(caches[layer] is caches[layer % 2] for layer in range(6)) and caches[0] is not caches[1]
    page = caches[0][:, 0].numel()  # a page holds one layer's block in each of the 2 tensors
    full = spec.allocate(10, "cpu")  # the unsplit cache: 10 blocks of 6 layers, the bytes of 30 pages of 2
    assert sum(c.numel() for c in full) == 30 * 2 * page


def test_what_keeps_one_layer_group(llama_dir):
    config = EngineConfig.create(str(llama_dir), dtype="float32")
    spec = KVCacheSpec.dense(2, 2, 8, 4, torch.float32)
    assert layer_groups_blocker(config, spec) is None
    draft = EngineConfig.create(str(llama_dir), dtype="float32", speculative_method="ngram")
    assert "speculative" in layer_groups_blocker(draft, spec)
    policy = EngineConfig.create(str(llama_dir), dtype="float32", kv_policy="streaming", kv_budget=64)
    assert "kv_policy=streaming" in layer_groups_blocker(policy, spec)
