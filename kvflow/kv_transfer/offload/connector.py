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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.config import CacheConfig
from kvflow.kv_transfer.base import ConnectorEvents, ConnectorRequest, KVConnector, LoadResult
from kvflow.kv_transfer.offload.chunk_file import BlockEntry
from kvflow.kv_transfer.offload.cost_model import LoadCostModel
from kvflow.kv_transfer.offload.file_tier import FileTier
from kvflow.kv_transfer.offload.host_tier import HostTier
from kvflow.kv_transfer.offload.io_threads import LoadJob, OffloadIO, staging
from kvflow.kv_transfer.offload.tier import Expected, Tier, TierIdentity, TierStats
from kvflow.worker.step import ScheduledChunk

logger = logging.getLogger(__name__)

#: Most bytes of KV in one chunk file (a 2k-token prompt of a 135M model: two files; at least one block).
MAX_CHUNK_BYTES = 32 << 20
#: Staged records not yet written beyond this are dropped rather than let memory grow (a slow disk).
MAX_PENDING_WRITE_BYTES = 512 << 20


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
    tiers: list[TierStats] = field(default_factory=list)  # each tier's own (`stats_snapshot` fills it)


@dataclass
class _Staged:
    """Blocks [first, first + n) of a request, copied out after the step that completed them."""

    request: ConnectorRequest
    first: int
    records: torch.Tensor
    ready: torch.cuda.Event | None = None  # GPU: the device-to-host copy's completion


class _StepClock:
    """A step's wall time for the cost model: host time on a CPU, CUDA events on a GPU (a step's host
    time there is only its kernel launches); read at the next `collect`, when the step has finished."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._started = 0.0
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self.pending: tuple[float | tuple[torch.cuda.Event, torch.cuda.Event], int, int] | None = None

    def begin(self) -> None:
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._started = time.perf_counter()

    def end(self, prompt_tokens: int, total_tokens: int) -> None:
        if self.cuda and self._events is not None:
            self._events[1].record()
            self.pending = (self._events, prompt_tokens, total_tokens)
        else:
            self.pending = (time.perf_counter() - self._started, prompt_tokens, total_tokens)

    def read(self) -> tuple[float, int, int] | None:
        if self.pending is None:
            return None
        elapsed, prompt, total = self.pending
        self.pending = None
        if isinstance(elapsed, tuple):
            elapsed[1].synchronize()
            elapsed = elapsed[0].elapsed_time(elapsed[1]) / 1e3
        return elapsed, prompt, total


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
        self.io: OffloadIO | None = None
        self._clock: _StepClock | None = None
        # Per request, cleaned up when it finishes (`request_finished`) or its load is cancelled.
        self._offered: dict[str, int] = {}  # blocks already staged
        self._no_load: set[str] = set()  # its load failed: it computes
        self._looked_up: set[str] = set()  # counted in the lookup stats
        self._planned: dict[str, int] = {}  # the block its load ends at (`num_tokens_to_load`)
        self._staged: list[_Staged] = []
        self._step_chunks: Sequence[ScheduledChunk] = ()
        self._loads: dict[str, LoadJob] = {}

    # ------------------------------------------------------------- set-up
    def register_kv_caches(self, spec: KVCacheSpec, caches: list[LayerKV]) -> None:
        self.spec, self.caches = spec, caches
        record = spec.block_record_bytes
        self.cost = LoadCostModel(record, spec.block_size, self.cache.kv_offload_load)
        device = self._device
        self._clock = _StepClock(device)
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
        self.io = OffloadIO(spec, caches, self.tiers, self.cost, device)
        atexit.register(self.close)  # an offline run that ends writes what it staged

    def _add_tier(self, tier: Tier) -> None:
        assert self.cost is not None
        self.tiers.append(tier)
        self.cost.add_tier(tier.name, tier.probe_bandwidth())

    @property
    def _device(self) -> torch.device:
        first = self.caches[0]
        return (first if isinstance(first, torch.Tensor) else first[0]).device

    @property
    def busy(self) -> bool:
        """Loads in flight, or staged blocks the next `collect` hands to the writer."""
        return bool(self._loads) or bool(self._staged)

    # ---------------------------------------------------------- scheduler side
    def num_tokens_to_load(self, request: ConnectorRequest) -> int:
        """The tokens the request will have once the tiers' blocks after its working-pool hit are loaded
        (0: nothing to load, or recomputing is faster)."""
        if self.io is None or request.skip_prefix_cache or request.request_id in self._no_load:
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
        load = index > first and self.cost.should_load(blocks)
        if request.request_id not in self._looked_up:  # count a request once, not each admission attempt
            self._looked_up.add(request.request_id)
            self.stats.lookups += 1
            self.stats.queried_blocks += last - first
            self.stats.found_blocks += index - first
            self.stats.skipped_loads += index > first and not load
        if not load:
            return 0
        self._planned[request.request_id] = index
        return index * bs

    def _tier_holding(self, key: int) -> Tier | None:
        return next((tier for tier in self.tiers if tier.contains(key)), None)

    def start_load(self, request: ConnectorRequest, start: int = 0) -> None:
        """Load the blocks from `start` (the working pool's hit) to `num_tokens_to_load` on a loader thread."""
        assert self.spec is not None and self.io is not None
        bs = self.spec.block_size
        first = start // bs
        last = self._planned.pop(request.request_id)
        hashes, tokens = request.block_hashes, request.all_token_ids
        expected = [Expected(hashes[i], hashes[i - 1] if i else None, tuple(tokens[i * bs:(i + 1) * bs]))
                    for i in range(first, last)]
        job = LoadJob(request.request_id, list(request.block_ids[first:last]), expected, first)
        self._loads[request.request_id] = job
        self.stats.loads += 1
        self.io.load(job)

    def cancel_load(self, request_id: str) -> None:
        job = self._loads.get(request_id)
        if job is not None:
            job.cancel.set()

    def request_finished(self, request: ConnectorRequest) -> bool:
        self._forget_request(request.request_id)
        return False

    def _forget_request(self, request_id: str) -> None:
        self._offered.pop(request_id, None)
        self._no_load.discard(request_id)
        self._planned.pop(request_id, None)
        self._looked_up.discard(request_id)

    def collect(self) -> ConnectorEvents:
        """Feed the cost model the last step's time, queue the blocks it completed for the writer, and
        report the loads that ended."""
        if self.io is None:
            return ConnectorEvents()
        assert self.cost is not None and self._clock is not None
        timed = self._clock.read()
        if timed is not None:
            self.cost.observe_step(*timed)
        self._hand_staged_to_writer()
        results = self.io.results()
        for result in results:
            self._loads.pop(result.request_id, None)
            if result.error == "cancelled":  # its request was aborted: nothing of it stays here
                self._forget_request(result.request_id)
            elif not result.ok:
                self.stats.failed_loads += 1
                self._no_load.add(result.request_id)
        return ConnectorEvents(loaded=results)

    def finish_load(self, request: ConnectorRequest, result: LoadResult) -> bool:
        loaded = min(result.num_tokens, request.num_prompt_tokens)
        request.num_cached_tokens = max(request.num_cached_tokens, loaded)
        return True

    # ------------------------------------------------------------- worker side
    def begin_step(self, chunks: Sequence[ScheduledChunk]) -> bool:
        self._step_chunks = chunks
        if self._clock is not None:
            self._clock.begin()
        return False

    def end_step(self) -> None:
        """Time the step (the cost model's compute term), then copy out the blocks it completed. A step
        whose forward failed is copied too, but never written: `collect` keys only computed blocks."""
        if self.io is None:
            return
        assert self._clock is not None
        chunks, self._step_chunks = self._step_chunks, ()
        prompt = sum(c.num_tokens for c in chunks if c.start < c.request.num_prompt_tokens)
        self._clock.end(prompt, sum(c.num_tokens for c in chunks))
        started = time.perf_counter()
        for chunk in chunks:
            self._stage(chunk)
        self.stats.stage_seconds += time.perf_counter() - started

    def _stage(self, chunk: ScheduledChunk) -> None:
        """Copy the blocks this chunk completed: all of them up to its last token that is certain
        (a speculative chunk's proposals may be rejected)."""
        assert self.spec is not None and self.io is not None
        request = chunk.request
        bs = self.spec.block_size
        complete = (chunk.start + chunk.num_tokens - len(chunk.spec_token_ids)) // bs
        offered = self._offered.get(request.request_id)
        if offered is None or chunk.start // bs < offered:
            offered = chunk.start // bs  # first seen, or recomputing after a preemption
        self._offered[request.request_id] = max(offered, complete)
        if complete <= offered:
            return
        if self.io.counters.write_queue_bytes > MAX_PENDING_WRITE_BYTES:
            self.io.count(dropped_write_blocks=complete - offered)
            return
        records = staging(complete - offered, self.spec.block_record_bytes, self._device)
        self.spec.gather_blocks(self.caches, request.block_ids[offered:complete], records)
        ready = None
        if self._device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._staged.append(_Staged(request, offered, records, ready))

    def _hand_staged_to_writer(self) -> None:
        """Key the staged records by their prefix-cache hashes and queue them for the writer. Only blocks
        of computed tokens are written: a step that failed never advanced `num_computed_tokens`, so what
        it staged is dropped here (its KV may be garbage), and so is anything `update` never hashed."""
        assert self.spec is not None and self.io is not None
        staged, self._staged = self._staged, []
        bs = self.spec.block_size
        per_chunk = max(1, MAX_CHUNK_BYTES // self.spec.block_record_bytes)
        for item in staged:
            request = item.request
            hashes, tokens = request.block_hashes, request.all_token_ids
            end = min(item.first + len(item.records), request.num_computed_tokens // bs, len(hashes))
            if end <= item.first:
                continue
            records = item.records[:end - item.first]
            if item.ready is not None:
                item.ready.synchronize()
            entries = [BlockEntry(hashes[i], hashes[i - 1] if i else None, 0, tuple(tokens[i * bs:(i + 1) * bs]))
                       for i in range(item.first, end)]
            for start in range(0, len(entries), per_chunk):
                self.io.write(entries[start:start + per_chunk], records[start:start + per_chunk])

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Write what is staged and queued (a graceful stop keeps it for the next run), then stop."""
        atexit.unregister(self.close)
        if self.io is None:
            return
        self._hand_staged_to_writer()
        self.io.close()
        self.io = None
        for tier in self.tiers:
            tier.close()

    def stats_snapshot(self) -> OffloadStats:
        """A copy of the counters (the I/O threads keep changing theirs)."""
        snapshot = OffloadStats(**{**self.stats.__dict__,
                                   "tiers": [TierStats(**tier.stats.__dict__) for tier in self.tiers]})
        snapshot.load_queue = len(self._loads)
        if self.io is not None:
            counters = self.io.counters
            snapshot.loaded_blocks = counters.loaded_blocks
            snapshot.dropped_write_blocks = counters.dropped_write_blocks
            snapshot.write_queue_bytes = counters.write_queue_bytes
        return snapshot
