"""The runner's side of a KV cache split into layer groups (kvflow/core/kv_cache_manager.py explains why).

With G groups of g = L / G consecutive layers, the cache holds g tensors of pages and layer l stores into
tensor l mod g through the table of group l // g. A page is one group's layers for a block of tokens, so
the pool stays one pool (a free page serves any group) and its bytes are those of the unsplit cache. One
extra page past the pool, never handed out, takes the writes a step must not make: tokens recomputed in
a group whose pages for them came from the prefix cache (another request's, read-only) store there, and
attention reads the cached pages through the group's table. Every backend then runs unchanged, given the
group's table and slots: the C++ forward takes them stacked ([G, B, M] and [G, T]), the PyTorch modules
one metadata per group (`AttentionMetadata.layer_groups`).
"""

from __future__ import annotations

import dataclasses

import torch

from kvflow.attention.backend import AttentionBackend, AttentionMetadata
from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.config import EngineConfig
from kvflow.worker.step import ScheduledChunk


def layer_groups_blocker(config: EngineConfig, spec: KVCacheSpec) -> str | None:
    """Why this engine keeps one layer group though its variants could share KV (None: nothing stops it).
    What reads or moves a request's blocks as one table of every layer does not know the groups yet."""
    cache = config.cache
    reasons = [
        (cache.kv_policy != "none", f"kv_policy={cache.kv_policy} reads one block table per request"),
        (bool(spec.kivi_bits), "a KIVI cache's ring follows one block table"),
        (config.speculative.enabled, "speculative decoding's draft KV follows one block table"),
        (cache.kv_offload, "the KV offload tiers move whole blocks of every layer"),
        (config.kv_transfer is not None, "disaggregated instances move whole blocks of every layer"),
    ]
    return next((why for stops, why in reasons if stops), None)


def allocate_grouped(spec: KVCacheSpec, groups: int, num_pages: int, device: torch.device) -> list[LayerKV]:
    """Every layer's cache: g tensors of `num_pages` pages and the scratch page (index `num_pages`), layer l
    on tensor l mod g."""
    size = spec.num_layers // groups
    tensors = dataclasses.replace(spec, num_layers=size).allocate(num_pages + 1, device)
    return [tensors[layer % size] for layer in range(spec.num_layers)]


def group_step_tables(chunks: list[ScheduledChunk], groups: int, kv_positions: torch.Tensor,
                      seq_index: torch.Tensor, block_size: int, scratch_page: int,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's block tables [G, B, M] (padded with 0) and slot of each token [G, T]: the scratch page's
    where the token's block in that group is a prefix-cache page (its index is below the group's cached
    blocks, which a request never writes)."""
    requests = [c.request for c in chunks]
    if any(len(r.kv_groups) != groups - 1 for r in requests):
        raise RuntimeError(f"a request's block tables do not match the cache's {groups} layer groups")
    width = max(max(len(r.block_ids), *(len(t.block_ids) for t in r.kv_groups)) for r in requests)
    # One flat list, group-major, each table padded: a 30-group step of 32 sequences is built in a fraction
    # of what nested lists cost.
    flat: list[int] = []
    cached: list[int] = []
    for g in range(groups):
        for r in requests:
            table = r if g == 0 else r.kv_groups[g - 1]
            flat += table.block_ids
            flat += [0] * (width - len(table.block_ids))
            cached.append(table.num_cached_blocks)
    device = kv_positions.device
    block_tables = torch.tensor(flat, dtype=torch.long, device=device).view(groups, len(requests), width)
    read_only = torch.tensor(cached, dtype=torch.long, device=device).view(groups, len(requests))
    index = kv_positions // block_size
    offset = kv_positions % block_size
    pages = block_tables[:, seq_index, index]  # [G, T]
    pages = torch.where(index[None, :] < read_only[:, seq_index], scratch_page, pages)
    return block_tables, pages * block_size + offset[None, :]


def group_metadata(meta: AttentionMetadata, block_tables: torch.Tensor, slots: torch.Tensor,
                   backend: AttentionBackend, layers_per_group: int) -> None:
    """Give `meta` (group 0's, prepared) one prepared metadata per layer group, for the PyTorch modules'
    attention layers: itself for group 0, a copy with the group's tables and slots for each other."""
    per_group = [meta]
    for g in range(1, block_tables.shape[0]):
        own = dataclasses.replace(meta, slot_mapping=slots[g], block_tables=block_tables[g], extra={})
        backend.prepare(own)
        per_group.append(own)
    meta.layer_groups = per_group
    meta.layers_per_group = layers_per_group
