"""What every offload tier is: a store of block records keyed by prefix-cache hash, with its counters.

A tier stores *block records* (`KVCacheSpec.gather_blocks`: one block's KV, every layer) under the
block's prefix-cache hash, with the block's parent hash and tokens so a load can check it is the
KV of exactly the request's prefix. The tiers are a host-memory store (`host_tier.py`) and a file
store on local SSD (`file_tier.py`); the connector (`connector.py`) puts them behind the working
pool, the host tier first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvflow.kv_transfer.offload.chunk_file import BlockEntry


@dataclass
class TierStats:
    """One tier's counters since the engine started (blocks and bytes of KV records)."""

    name: str
    capacity_bytes: int = 0
    stored_blocks: int = 0
    stored_bytes: int = 0  # what it holds now (the file tier: its files' sizes)
    hit_blocks: int = 0  # blocks loaded from it
    blocks_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    evicted_blocks: int = 0
    errors: int = 0  # reads, writes and checks that failed (each logged)


@dataclass(frozen=True)
class TierIdentity:
    """What the KV in a tier belongs to: a tier written for anything else is never read.

    `model` fingerprints the weights (kvflow/model/fingerprint.py), `kv_format` is the KV-cache
    spec's wire format (dtypes, widths, scale), and the block size and record size fix the layout.
    """

    model: str
    kv_format: str
    block_size: int
    record_bytes: int
    description: dict[str, str] = field(default_factory=dict, compare=False)  # for people: the model's path

    @property
    def digest(self) -> bytes:
        text = json.dumps([self.model, self.kv_format, self.block_size, self.record_bytes])
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def manifest(self) -> dict[str, object]:
        return {"model_fingerprint": self.model, "kv_format": self.kv_format, "block_size": self.block_size,
                "record_bytes": self.record_bytes, **self.description}


@dataclass(frozen=True)
class Expected:
    """What a load expects of a block: the request's own hash, parent hash and tokens for it."""

    key: int
    parent: int | None
    tokens: tuple[int, ...]

    def matches(self, entry: BlockEntry) -> bool:
        return entry.key == self.key and entry.parent == self.parent and entry.tokens == self.tokens


class Tier(Protocol):
    name: str
    stats: TierStats

    def contains(self, key: int) -> bool: ...

    def write(self, blocks: list[BlockEntry], records: torch.Tensor) -> int:
        """Store blocks (their entries, uint8 records [n, record_bytes]); returns how many it holds now
        (fewer: no room); OSError if a write failed."""
        ...

    def read(self, expected: list[Expected], out: torch.Tensor) -> int:
        """Read the records of a run of blocks into `out` [n, record_bytes]: how many of the leading
        ones it read and verified (the rest are misses; a damaged one is dropped from the tier)."""
        ...

    def probe_bandwidth(self) -> float:
        """Bytes per second this tier reads at, probed when it opens (the cost model's prior)."""
        ...

    def close(self) -> None: ...
