"""The host-memory tier: block records in RAM, least recently used evicted first.

On a GPU this is the tier between device memory and the SSD (records in pinned memory, so loads
and stores are DMA copies). On a CPU-only machine the working pool is host memory already, so a
host tier only adds a second, larger LRU in front of the file tier; it is off unless
`--kv-offload-host-size` asks for it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch

from kvflow.kv_transfer.offload.chunk_file import BlockEntry
from kvflow.kv_transfer.offload.tier import Expected, TierStats


class HostTier:
    name = "host"

    def __init__(self, capacity_bytes: int, record_bytes: int, pin_memory: bool = False) -> None:
        self.record_bytes = record_bytes
        self.capacity_blocks = capacity_bytes // record_bytes
        self.pin_memory = pin_memory
        self.stats = TierStats(self.name, capacity_bytes=self.capacity_blocks * record_bytes)
        self._blocks: OrderedDict[int, tuple[BlockEntry, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def contains(self, key: int) -> bool:
        return key in self._blocks

    def write(self, blocks: list[BlockEntry], records: torch.Tensor) -> int:
        """Store copies of the records (one allocation per block, so evicting a block frees it); returns
        how many blocks it holds of these."""
        started = time.perf_counter()
        stored = 0
        for entry, record in zip(blocks, records):
            if self.capacity_blocks < 1:
                break
            with self._lock:
                if entry.key in self._blocks:
                    self._blocks.move_to_end(entry.key)
                    stored += 1
                    continue
            copy = torch.empty(self.record_bytes, dtype=torch.uint8, pin_memory=self.pin_memory)
            copy.copy_(record)
            with self._lock:
                while len(self._blocks) >= self.capacity_blocks:
                    self._blocks.popitem(last=False)
                    self.stats.evicted_blocks += 1
                self._blocks[entry.key] = (entry, copy)
                self.stats.blocks_written += 1
                self.stats.bytes_written += self.record_bytes
                self._update_stored()
            stored += 1
        with self._lock:
            self.stats.write_seconds += time.perf_counter() - started
        return stored

    def read(self, expected: list[Expected], out: torch.Tensor) -> int:
        started = time.perf_counter()
        count = 0
        for i, want in enumerate(expected):
            with self._lock:
                found = self._blocks.get(want.key)
                if found is None or not want.matches(found[0]):
                    break
                self._blocks.move_to_end(want.key)
            out[i].copy_(found[1], non_blocking=True)
            count += 1
        with self._lock:
            self.stats.hit_blocks += count
            self.stats.bytes_read += count * self.record_bytes
            self.stats.read_seconds += time.perf_counter() - started
        return count

    def probe_bandwidth(self, nbytes: int = 16 << 20) -> float:
        """Bytes per second of a record copy of `nbytes` (the cost model's prior)."""
        source = torch.empty(nbytes, dtype=torch.uint8)
        target = torch.empty_like(source)
        target.copy_(source)  # fault the pages in first
        started = time.perf_counter()
        target.copy_(source)
        return nbytes / max(time.perf_counter() - started, 1e-6)

    def _update_stored(self) -> None:
        self.stats.stored_blocks = len(self._blocks)
        self.stats.stored_bytes = len(self._blocks) * self.record_bytes

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._update_stored()
