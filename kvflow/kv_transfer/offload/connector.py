"""OffloadConnector: host and file tiers behind the prefix cache, as a KV connector (base.py).

Write path — write-through, on I/O threads. When a step completes a block (all its tokens computed,
so the prefix cache indexes it), the worker-side hook copies the block's KV into a staging record
right after the forward pass (`end_step`: a memory copy, the only work on the engine thread), and the
next `collect` hands the records, now keyed by their prefix-cache hashes, to the writer thread, which
writes them to every tier that lacks them. Write-through rather than on eviction, because a block is
evicted when the pool hands it out again, in the middle of scheduling the step that overwrites it:
writing it then would stall that step or hold the block back, while written through it is already
safe, and it is on disk for the next server run even if this one is killed. The cost is writing
blocks that are never reused, which the tier's LRU bounds.

Read path. For a waiting request the scheduler first takes the working pool's prefix hit, then asks
`num_tokens_to_load`: the blocks after the hit that the tiers hold, if the performance model
(`cost_model.py`) says loading them beats recomputing them. The request gets blocks and waits in
RECEIVING, holding no step, while a loader thread reads the records (host tier first), checks them
against the request's own hashes and tokens, and writes them into its blocks; the engine's other
requests keep stepping. A load that reads only part of the run still counts for what it read; one
that reads nothing fails, and the request computes its prompt (it is never offered a load again).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.config import CacheConfig
from kvflow.kv_transfer.base import ConnectorEvents, ConnectorRequest, KVConnector, LoadResult
from kvflow.kv_transfer.offload.chunk_file import BlockEntry, record_crc
from kvflow.kv_transfer.offload.cost_model import LoadCostModel
from kvflow.kv_transfer.offload.file_tier import FileTier
from kvflow.kv_transfer.offload.host_tier import HostTier
from kvflow.kv_transfer.offload.tier import Expected, Tier, TierIdentity, TierStats
from kvflow.worker.step import ScheduledChunk

logger = logging.getLogger(__name__)

#: Most blocks in one chunk file (a 2k-token prompt of a 135M model: two files of ~23 MB).
MAX_CHUNK_BLOCKS = 64
#: Staged records not yet written beyond this are dropped rather than let memory grow (a slow disk).
MAX_PENDING_WRITE_BYTES = 512 << 20
#: Threads loading KV from the tiers.
NUM_LOADERS = 2


@dataclass
class OffloadStats:
    """The connector's counters (each tier keeps its own: `TierStats`)."""

    lookups: int = 0  # requests looked up in the tiers (once each, however often admission is retried)
    queried_blocks: int = 0  # blocks past the working pool's hit looked up
    found_blocks: int = 0  # of those, blocks a tier holds
    loads: int = 0  # loads started
    loaded_blocks: int = 0
    failed_loads: int = 0
    skipped_loads: int = 0  # hits the performance model left to recompute
    load_queue: int = 0  # loads waiting for or on a loader thread now
    write_queue_bytes: int = 0  # staged records waiting for the writer now
    dropped_write_blocks: int = 0  # staged records dropped (the writer fell behind) or failed to write
    stage_seconds: float = 0.0  # engine-thread time spent copying completed blocks out
    tiers: list[TierStats] = field(default_factory=list)


@dataclass
class _Staged:
    """Blocks [first, first + n) of a request, copied out after the step that completed them."""

    request: ConnectorRequest
    first: int
    records: torch.Tensor
    ready: torch.cuda.Event | None = None  # GPU: the device-to-host copy's completion


@dataclass
class _Load:
    request_id: str
    block_ids: list[int]
    expected: list[Expected]
    first_block: int
    cancel: threading.Event = field(default_factory=threading.Event)


class OffloadConnector(KVConnector):
    def __init__(self, cache: CacheConfig, model_fingerprint: str, model_name: str = "") -> None:
        self.cache = cache
        self.model_fingerprint = model_fingerprint
        self.model_name = model_name
        self.stats = OffloadStats()
        self.tiers: list[Tier] = []
        self.spec: KVCacheSpec | None = None
        self.caches: list[LayerKV] = []
        self.cost: LoadCostModel | None = None
        self._offered: dict[str, int] = {}  # request id -> blocks already staged
        self._no_load: set[str] = set()  # requests whose load failed: they compute
        self._looked_up: set[str] = set()
        self._planned: dict[str, int] = {}  # request id -> the block its load ends at (`num_tokens_to_load`)
        self._staged: list[_Staged] = []
        self._step_chunks: Sequence[ScheduledChunk] = ()
        self._step_started = 0.0
        self._loads: dict[str, _Load] = {}
        self._results: list[LoadResult] = []
        self._lock = threading.Lock()
        self._load_queue: queue.Queue[_Load | None] = queue.Queue()
        self._write_queue: queue.Queue[tuple[list[BlockEntry], torch.Tensor] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------- set-up
    def register_kv_caches(self, spec: KVCacheSpec, caches: list[LayerKV]) -> None:
        self.spec, self.caches = spec, caches
        record = spec.block_record_bytes
        self.cost = LoadCostModel(record, spec.block_size, self.cache.kv_offload_load)
        device = self._device
        if self.cache.kv_offload_host_size > 0:
            host = HostTier(int(self.cache.kv_offload_host_size * 2**30), record, pin_memory=device.type == "cuda")
            self._add_tier(host)
        if self.cache.kv_offload_dir is not None:
            identity = TierIdentity(self.model_fingerprint, spec.wire_format, spec.block_size, record,
                                    {"model": self.model_name})
            try:
                tier = FileTier(self.cache.kv_offload_dir, identity, int(self.cache.kv_offload_size * 2**30),
                                self.cache.kv_offload_io)
            except OSError as exc:
                logger.error("KV offload: cannot use %s for the file tier (%s); serving without it",
                             self.cache.kv_offload_dir, exc)
            else:
                self._add_tier(tier)
        if not self.tiers:
            logger.error("KV offload: no tier could be opened; every prefix that misses the working pool is "
                         "recomputed")
            return
        self._start_threads()

    def _add_tier(self, tier: Tier) -> None:
        assert self.cost is not None and self.spec is not None
        self.tiers.append(tier)
        self.stats.tiers.append(tier.stats)
        self.cost.add_tier(tier.name, tier.probe_bandwidth())

    def _start_threads(self) -> None:
        self._threads.append(threading.Thread(target=self._write_loop, name="kvflow-kv-offload-write",
                                              daemon=True))
        for i in range(NUM_LOADERS):
            self._threads.append(threading.Thread(target=self._load_loop, name=f"kvflow-kv-offload-load-{i}",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        atexit.register(self.close)  # an offline run that ends writes what it staged

    @property
    def _device(self) -> torch.device:
        assert self.spec is not None
        first = self.caches[0]
        return (first if isinstance(first, torch.Tensor) else first[0]).device

    def _staging(self, num_blocks: int) -> torch.Tensor:
        assert self.spec is not None
        records = torch.empty(num_blocks, self.spec.block_record_bytes, dtype=torch.uint8)
        return records.pin_memory() if self._device.type == "cuda" else records

    @property
    def busy(self) -> bool:
        """Loads in flight, or staged blocks the next `collect` hands to the writer."""
        return bool(self._loads) or bool(self._staged)

    # ---------------------------------------------------------- scheduler side
    def num_tokens_to_load(self, request: ConnectorRequest) -> int:
        """The tokens the request will have once the tiers' blocks after its working-pool hit are loaded
        (0: nothing to load, or recomputing is faster)."""
        if not self.tiers or request.skip_prefix_cache or request.request_id in self._no_load:
            return 0
        assert self.spec is not None and self.cost is not None
        bs = self.spec.block_size
        first = request.num_computed_tokens // bs
        last = min((request.num_tokens - 1) // bs, len(request.block_hashes))  # one token is always computed
        if request.num_computed_tokens % bs or first >= last:
            return 0
        blocks: dict[str, int] = {}
        index = first
        while index < last:
            tier = self._tier_holding(request.block_hashes[index])
            if tier is None:
                break
            blocks[tier.name] = blocks.get(tier.name, 0) + 1
            index += 1
        if request.request_id not in self._looked_up:  # count a request once, not each admission attempt
            self._looked_up.add(request.request_id)
            self.stats.lookups += 1
            self.stats.queried_blocks += last - first
            self.stats.found_blocks += index - first
        if index == first:
            return 0
        if not self.cost.should_load(blocks):
            self.stats.skipped_loads += 1
            return 0
        self._planned[request.request_id] = index
        return index * bs

    def _tier_holding(self, key: int) -> Tier | None:
        return next((tier for tier in self.tiers if tier.contains(key)), None)

    def start_load(self, request: ConnectorRequest, start: int = 0) -> None:
        """Load the blocks from `start` (the working pool's hit) to `num_tokens_to_load` on a loader thread."""
        assert self.spec is not None
        bs = self.spec.block_size
        first = start // bs
        last = self._planned.pop(request.request_id)
        hashes, tokens = request.block_hashes, request.all_token_ids
        expected = [Expected(hashes[i], hashes[i - 1] if i else None, tuple(tokens[i * bs:(i + 1) * bs]))
                    for i in range(first, last)]
        job = _Load(request.request_id, list(request.block_ids[first:last]), expected, first)
        with self._lock:
            self._loads[request.request_id] = job
            self.stats.load_queue = len(self._loads)
        self.stats.loads += 1
        self._load_queue.put(job)

    def cancel_load(self, request_id: str) -> None:
        with self._lock:
            job = self._loads.get(request_id)
        if job is not None:
            job.cancel.set()

    def request_finished(self, request: ConnectorRequest) -> bool:
        self._offered.pop(request.request_id, None)
        self._no_load.discard(request.request_id)
        self._planned.pop(request.request_id, None)
        self._looked_up.discard(request.request_id)
        return False

    def collect(self) -> ConnectorEvents:
        self._hand_staged_to_writer()
        with self._lock:
            results, self._results = self._results, []
            for result in results:
                self._loads.pop(result.request_id, None)
            self.stats.load_queue = len(self._loads)
        for result in results:
            if not result.ok:
                self.stats.failed_loads += 1
                self._no_load.add(result.request_id)
        return ConnectorEvents(loaded=results)

    def finish_load(self, request: ConnectorRequest, result: LoadResult) -> bool:
        request.num_cached_tokens = max(request.num_cached_tokens, result.num_tokens)
        return True

    # ------------------------------------------------------------- worker side
    def begin_step(self, chunks: Sequence[ScheduledChunk]) -> bool:
        self._step_chunks = chunks
        self._step_started = time.perf_counter()
        return False

    def end_step(self) -> None:
        """Time the step (the performance model's compute term), then copy out the blocks it completed."""
        if self.spec is None or not self.tiers:
            return
        assert self.cost is not None
        elapsed = time.perf_counter() - self._step_started
        prompt = sum(c.num_tokens for c in self._step_chunks if c.start < c.request.num_prompt_tokens)
        self.cost.observe_step(elapsed, prompt, sum(c.num_tokens for c in self._step_chunks))
        started = time.perf_counter()
        for chunk in self._step_chunks:
            self._stage(chunk)
        self._step_chunks = ()
        self.stats.stage_seconds += time.perf_counter() - started

    def _stage(self, chunk: ScheduledChunk) -> None:
        """Copy the blocks this chunk completed: all of them up to its last token that is certain
        (a speculative chunk's proposals may be rejected)."""
        assert self.spec is not None
        request = chunk.request
        bs = self.spec.block_size
        complete = (chunk.start + chunk.num_tokens - len(chunk.spec_token_ids)) // bs
        offered = self._offered.get(request.request_id)
        if offered is None or chunk.start // bs < offered:
            offered = chunk.start // bs  # first seen, or recomputing after a preemption
        self._offered[request.request_id] = max(offered, complete)
        if complete <= offered or self.stats.write_queue_bytes > MAX_PENDING_WRITE_BYTES:
            if complete > offered:
                self.stats.dropped_write_blocks += complete - offered
            return
        block_ids = request.block_ids[offered:complete]
        records = self._staging(len(block_ids))
        self.spec.gather_blocks(self.caches, block_ids, records)
        ready = None
        if self._device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._staged.append(_Staged(request, offered, records, ready))
        self._count_pending(records.numel())

    def _hand_staged_to_writer(self) -> None:
        """Key the staged records by their prefix-cache hashes (set by the step's update) and queue them."""
        staged, self._staged = self._staged, []
        bs = self.spec.block_size if self.spec is not None else 0
        for item in staged:
            hashes, tokens = item.request.block_hashes, item.request.all_token_ids
            count = min(len(item.records), len(hashes) - item.first)  # an aborted request: unhashed blocks
            entries = [BlockEntry(hashes[i], hashes[i - 1] if i else None, 0, tuple(tokens[i * bs:(i + 1) * bs]))
                       for i in range(item.first, item.first + max(count, 0))]
            if count < len(item.records):
                self._count_pending(-item.records[max(count, 0):].numel())
                if count <= 0:
                    continue
                item.records = item.records[:count]
            if item.ready is not None:
                item.ready.synchronize()
            for start in range(0, len(entries), MAX_CHUNK_BLOCKS):
                self._write_queue.put((entries[start:start + MAX_CHUNK_BLOCKS],
                                       item.records[start:start + MAX_CHUNK_BLOCKS]))

    def _count_pending(self, nbytes: int) -> None:
        with self._lock:
            self.stats.write_queue_bytes += nbytes

    # ------------------------------------------------------------- I/O threads
    def _write_loop(self) -> None:
        while True:
            item = self._write_queue.get()
            if item is None:
                return
            entries, records = item
            try:
                self._write(entries, records)
            finally:
                self._count_pending(-records.numel())

    def _write(self, entries: list[BlockEntry], records: torch.Tensor) -> None:
        checked: list[BlockEntry] | None = None
        for tier in self.tiers:
            keep = [i for i, entry in enumerate(entries) if not tier.contains(entry.key)]
            if not keep:
                continue
            if tier.name == "file" and checked is None:  # checksums only where records can rot
                checked = [BlockEntry(e.key, e.parent, record_crc(records[i].numpy().data), e.tokens)
                           for i, e in enumerate(entries)]
            source = checked if tier.name == "file" and checked is not None else entries
            rows = records if len(keep) == len(entries) else records[keep]
            try:
                tier.write([source[i] for i in keep], rows)
            except OSError as exc:
                self.stats.dropped_write_blocks += len(keep)
                logger.warning("KV offload: writing %d blocks to the %s tier failed (%s); they stay uncached "
                               "there", len(keep), tier.name, exc)

    def _load_loop(self) -> None:
        while True:
            job = self._load_queue.get()
            if job is None:
                return
            result = self._load(job)
            with self._lock:
                self._results.append(result)

    def _load(self, job: _Load) -> LoadResult:
        """Read the job's blocks from the tiers, host first, and write them into its blocks."""
        assert self.spec is not None and self.cost is not None
        started = time.perf_counter()
        result = LoadResult(job.request_id)
        records = self._staging(len(job.expected))
        done = 0
        try:
            while done < len(job.expected) and not job.cancel.is_set():
                tier = self._tier_holding(job.expected[done].key)
                if tier is None:
                    break
                tier_started = time.perf_counter()
                got = tier.read(job.expected[done:], records[done:])
                if got == 0:
                    break
                self.spec.scatter_blocks(self.caches, job.block_ids[done:done + got], records[done:done + got])
                self.cost.observe_load(tier.name, got * self.spec.block_record_bytes,
                                       time.perf_counter() - tier_started)
                self._promote(tier, job.expected[done:done + got], records[done:done + got])
                done += got
        except Exception as exc:  # noqa: BLE001 (any failure is a miss: the request computes its prompt)
            logger.warning("KV offload: loading KV for %s failed (%s)", job.request_id, exc)
            done = 0
        if job.cancel.is_set():
            result.error = "cancelled"
        elif done == 0:
            result.error = "no block could be read from the offload tiers"
        result.num_tokens = (job.first_block + done) * self.spec.block_size
        result.payload_bytes = result.wire_bytes = done * self.spec.block_record_bytes
        result.seconds = time.perf_counter() - started
        self.stats.loaded_blocks += done
        return result

    def _promote(self, source: Tier, expected: list[Expected], records: torch.Tensor) -> None:
        """Blocks read from a lower tier are copied into the tiers in front of it (the host tier)."""
        for tier in self.tiers:
            if tier is source:
                return
            try:
                tier.write([BlockEntry(e.key, e.parent, 0, e.tokens) for e in expected], records)
            except OSError:
                pass

    def close(self) -> None:
        """Write what is staged and queued (a graceful stop keeps it for the next run), then stop."""
        if not self._threads:
            return
        self._hand_staged_to_writer()
        self._write_queue.put(None)
        for _ in range(NUM_LOADERS):
            self._load_queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []
        for tier in self.tiers:
            tier.close()

    def stats_snapshot(self) -> OffloadStats:
        """A copy of the counters (the I/O threads keep changing them)."""
        return OffloadStats(**{**self.stats.__dict__,
                               "tiers": [TierStats(**t.__dict__) for t in self.stats.tiers]})
