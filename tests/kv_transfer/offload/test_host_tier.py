"""The host tier: LRU within its capacity, and only the exact block served."""

from __future__ import annotations

import torch

from kvflow.kv_transfer.offload.chunk_file import BlockEntry
from kvflow.kv_transfer.offload.host_tier import HostTier
from kvflow.kv_transfer.offload.tier import Expected

RECORD = 64


def _blocks(keys: list[int]) -> tuple[list[BlockEntry], torch.Tensor]:
    entries = [BlockEntry(k, None if i == 0 else keys[i - 1], 0, (k, k + 1)) for i, k in enumerate(keys)]
    records = torch.stack([torch.full((RECORD,), k % 251, dtype=torch.uint8) for k in keys])
    return entries, records


def _expect(entries: list[BlockEntry]) -> list[Expected]:
    return [Expected(e.key, e.parent, e.tokens) for e in entries]


def test_round_trip_and_lru_eviction_within_capacity():
    tier = HostTier(capacity_bytes=3 * RECORD + 10, record_bytes=RECORD)
    entries, records = _blocks([1, 2, 3])
    tier.write(entries, records)
    out = torch.zeros(3, RECORD, dtype=torch.uint8)
    assert tier.read(_expect(entries), out) == 3 and torch.equal(out, records)
    tier.read(_expect(entries[:1]), out[:1])  # block 1 is now the most recently used
    more, more_records = _blocks([4])
    tier.write(more, more_records)
    assert tier.stats.stored_blocks == 3 and tier.stats.stored_bytes <= tier.stats.capacity_bytes
    assert [tier.contains(k) for k in (1, 2, 3, 4)] == [True, False, True, True]
    assert tier.stats.evicted_blocks == 1 and tier.stats.hit_blocks == 4


def test_a_block_under_the_same_key_with_other_tokens_is_a_miss():
    tier = HostTier(capacity_bytes=10 * RECORD, record_bytes=RECORD)
    entries, records = _blocks([5, 6])
    tier.write(entries, records)
    wrong = [Expected(5, None, (5, 6)), Expected(6, 5, (0, 0))]
    out = torch.zeros(2, RECORD, dtype=torch.uint8)
    assert tier.read(wrong, out) == 1
    assert tier.read([Expected(5, 123, (5, 6))], out[:1]) == 0  # another parent: another sequence


def test_a_tier_smaller_than_a_block_holds_nothing():
    tier = HostTier(capacity_bytes=RECORD - 1, record_bytes=RECORD)
    entries, records = _blocks([1])
    tier.write(entries, records)
    assert not tier.contains(1) and tier.stats.stored_bytes == 0
