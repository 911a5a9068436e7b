"""The offload tiers' I/O threads: one writer, a few loaders, never the engine thread.

The writer takes keyed block records and writes each to the tiers that lack it; the loaders read a
request's run of blocks from the tiers (the front tier first), check them, and write them into the
request's blocks in the KV cache. Every job ends with a result, whatever goes wrong inside it (an
error is logged and becomes a miss), so a request waiting for a load is never left waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.kv_transfer.base import LoadResult
from kvflow.kv_transfer.offload.chunk_file import BlockEntry, record_crc
from kvflow.kv_transfer.offload.cost_model import LoadCostModel
from kvflow.kv_transfer.offload.tier import Expected, Tier

logger = logging.getLogger(__name__)

#: Threads loading KV from the tiers.
NUM_LOADERS = 2


@dataclass
class LoadJob:
    request_id: str
    block_ids: list[int]  # the request's blocks to fill, one per expected block
    expected: list[Expected]
    first_block: int  # the index of the first of them in the request's block table
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class IOCounters:
    """What the threads count (the connector copies them into its stats)."""

    loaded_blocks: int = 0
    dropped_write_blocks: int = 0
    write_queue_bytes: int = 0


def staging(num_blocks: int, record_bytes: int, device: torch.device) -> torch.Tensor:
    """Host records for `num_blocks` blocks (pinned when the cache is on a GPU, for asynchronous copies)."""
    return torch.empty(num_blocks, record_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


class OffloadIO:
    def __init__(self, spec: KVCacheSpec, caches: list[LayerKV], tiers: list[Tier], cost: LoadCostModel,
                 device: torch.device) -> None:
        self.spec, self.caches, self.tiers, self.cost, self.device = spec, caches, tiers, cost, device
        self.counters = IOCounters()
        self._lock = threading.Lock()
        self._results: list[LoadResult] = []
        self._loads: queue.Queue[LoadJob | None] = queue.Queue()
        self._writes: queue.Queue[tuple[list[BlockEntry], torch.Tensor] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._write_loop, name="kvflow-kv-offload-write", daemon=True)]
        self._threads += [threading.Thread(target=self._load_loop, name=f"kvflow-kv-offload-load-{i}", daemon=True)
                          for i in range(NUM_LOADERS)]
        for thread in self._threads:
            thread.start()

    def count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + delta)

    # ------------------------------------------------------------------ write
    def write(self, entries: list[BlockEntry], records: torch.Tensor) -> None:
        """Queue keyed records for the writer (`records` is counted as pending until written)."""
        self.count(write_queue_bytes=records.numel())
        self._writes.put((entries, records))

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                return
            entries, records = item
            try:
                self._write(entries, records)
            finally:
                self.count(write_queue_bytes=-records.numel())

    def _write(self, entries: list[BlockEntry], records: torch.Tensor) -> None:
        checked: list[BlockEntry] | None = None
        for tier in self.tiers:
            keep = [i for i, entry in enumerate(entries) if not tier.contains(entry.key)]
            if not keep:
                continue
            try:
                if tier.name == "file" and checked is None:  # checksums where records can rot
                    checked = [BlockEntry(e.key, e.parent, record_crc(records[i].numpy().data), e.tokens)
                               for i, e in enumerate(entries)]
                source = checked if tier.name == "file" and checked is not None else entries
                rows = records if len(keep) == len(entries) else records[keep]
                stored = tier.write([source[i] for i in keep], rows)
            except Exception as exc:  # noqa: BLE001 (a failed write loses the tier copy, never a request)
                stored = 0
                logger.warning("KV offload: writing %d blocks to the %s tier failed (%s); they stay uncached "
                               "there", len(keep), tier.name, exc)
            if stored < len(keep):
                self.count(dropped_write_blocks=len(keep) - stored)

    # ------------------------------------------------------------------- load
    def load(self, job: LoadJob) -> None:
        self._loads.put(job)

    def results(self) -> list[LoadResult]:
        with self._lock:
            results, self._results = self._results, []
        return results

    def _load_loop(self) -> None:
        while True:
            job = self._loads.get()
            if job is None:
                return
            started = time.perf_counter()
            try:
                done = self._load(job)
                error = None
            except Exception as exc:  # noqa: BLE001 (any failure is a miss: the request computes its prompt)
                logger.warning("KV offload: loading KV for %s failed (%s)", job.request_id, exc)
                done, error = 0, f"load failed: {exc}"
            if job.cancel.is_set():
                error = "cancelled"
            elif done == 0 and error is None:
                error = "no block could be read from the offload tiers"
            nbytes = done * self.spec.block_record_bytes
            result = LoadResult(job.request_id, (job.first_block + done) * self.spec.block_size, error, nbytes,
                                nbytes, time.perf_counter() - started)
            with self._lock:
                self.counters.loaded_blocks += done
                self._results.append(result)

    def _load(self, job: LoadJob) -> int:
        """Read the job's blocks from the tiers, front tier first, into its blocks; how many it loaded."""
        records = staging(len(job.expected), self.spec.block_record_bytes, self.device)
        done = 0
        while done < len(job.expected) and not job.cancel.is_set():
            tier = next((t for t in self.tiers if t.contains(job.expected[done].key)), None)
            if tier is None:
                break
            started = time.perf_counter()
            got = tier.read(job.expected[done:], records[done:])
            if got == 0:
                break
            self.spec.scatter_blocks(self.caches, job.block_ids[done:done + got], records[done:done + got])
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the copies land before the result says so
            self.cost.observe_load(tier.name, got * self.spec.block_record_bytes, time.perf_counter() - started)
            self._promote(tier, job.expected[done:done + got], records[done:done + got])
            done += got
        return done

    def _promote(self, source: Tier, expected: list[Expected], records: torch.Tensor) -> None:
        """Blocks read from a lower tier are copied into the tiers in front of it (the host tier)."""
        for tier in self.tiers:
            if tier is source:
                return
            try:
                tier.write([BlockEntry(e.key, e.parent, 0, e.tokens) for e in expected], records)
            except Exception as exc:  # noqa: BLE001 (the block is loaded; the front copy is optional)
                logger.warning("KV offload: copying loaded blocks to the %s tier failed (%s)", tier.name, exc)

    # ------------------------------------------------------------------ close
    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued writes (a graceful stop keeps them for the next run), then stop."""
        self._writes.put(None)
        for _ in range(NUM_LOADERS):
            self._loads.put(None)
        for thread in self._threads:
            thread.join(timeout=timeout)
