"""Token-budget scheduler: continuous batching, chunked prefill, preemption by recompute.

Each step hands every running request the tokens it still needs (one for a decode, a chunk for a
prompt), oldest first, until the step's token budget is spent; then admits waiting requests in
the order the queue policy gives. When the KV cache is full, the most recently admitted running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (prompt + output so far) later. Its output continues unchanged.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvflow.config import SchedulerConfig
from kvflow.engine.kv_cache import KVCacheManager
from kvflow.engine.policies import QueuePolicy, make_policy
from kvflow.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from kvflow.disagg.connector import KVConnector

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `request` starting at position `start` are computed this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so its last logits give a new token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Decode instance: requests whose KV arrived since the last step, first token appended.
    loaded: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 connector: KVConnector | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.connector = connector
        # Decode instance: requests with blocks whose KV is being pulled, and aborted ones whose
        # pull has not stopped yet (their blocks are freed when it has).
        self.receiving: dict[str, Request] = {}
        self.cancelling: dict[str, Request] = {}
        self.num_kv_load_failures = 0
        # Finished loads not yet reported: (request id, KV bytes, wire bytes, seconds).
        self.transfer_records: list[tuple[str, int, int, float]] = []
        # Blocks came back outside a step's own work (a pulled transfer, a cancelled or failed
        # load): the engine loop reports its stats even when the step produced no output.
        self.blocks_released = False
        self.policy: QueuePolicy = make_policy(config.policy)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (stop string, abort) a request wherever it is; frees its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.RECEIVING:
            # A thread is writing into its blocks: free them once it has stopped (`collect_transfers`).
            del self.receiving[request_id]
            self.cancelling[request_id] = request
            request.status = status
            assert self.connector is not None
            self.connector.cancel_load(request_id)
            return request
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = status
        if not self._hand_over_blocks(request):
            self.kv.free(request)
        return request

    def _hand_over_blocks(self, request: Request) -> bool:
        """Prefill instance: a finished request's blocks go to the connector until pulled."""
        if self.connector is None or not self.connector.request_finished(request):
            return False
        self.kv.detach(request)  # the connector gives them back through `collect_transfers`
        return True

    def collect_transfers(self, out: SchedulerOutput) -> None:
        """Free blocks the connector is done with; admit requests whose KV arrived (or fell back)."""
        if self.connector is None:
            return
        events = self.connector.collect()
        for block_ids in events.release:
            self.kv.release(block_ids)
            self.blocks_released = True
        for result in events.loaded:
            request = self.cancelling.pop(result.request_id, None)
            if request is not None:
                self.kv.free(request)
                self.blocks_released = True
                continue
            request = self.receiving.pop(result.request_id, None)
            if request is None:
                continue
            if result.done is None or not self.connector.apply_done(request, result.done):
                # The KV is gone (prefill instance died, timed out, aborted), or came without the
                # prompt logprobs asked for: compute the prompt here.
                logger.warning("KV load for %s failed (%s); computing its prompt here", request.request_id,
                               result.error or "no prompt logprobs in the transfer")
                self.num_kv_load_failures += 1
                self.kv.free(request)
                self.blocks_released = True
                request.num_computed_tokens = 0  # an n > 1 sibling may have shared its leader's blocks
                request.kv_transfer = None
                request.status = RequestStatus.WAITING
                self.waiting.appendleft(request)
                continue
            self.transfer_records.append((request.request_id, result.payload_bytes, result.wire_bytes, result.seconds))
            request.kv_transfer = None
            request.num_computed_tokens = request.num_prompt_tokens
            self.kv.cache_full_blocks(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.loaded.append(request)
            status = request.check_stop()
            if status is not None:
                self.finish_request(request.request_id, status)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.collect_transfers(out)
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = request.num_tokens - request.num_computed_tokens
            n = min(remaining, budget)
            if n < remaining and not chunked:
                i += 1
                continue
            while not self.kv.allocate(request, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
            i += 1

        # A step that had to preempt admits nobody: the cache is already too small.
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        chunked = self.config.enable_chunked_prefill
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) + len(self.receiving) < self.config.max_num_seqs:
            request = self.policy.pop_next(self.waiting)
            if not self._ready(request):
                skipped.append(request)
                continue
            if self.connector is not None and self.connector.wants_load(request.kv_transfer):
                if not self._start_load(request):
                    self.waiting.appendleft(request)
                    break
                continue
            if request.num_computed_tokens == 0:
                self._attach_cached_prefix(request)
            remaining = request.num_tokens - request.num_computed_tokens
            n = min(remaining, budget)
            if (n < remaining and not chunked) or not self.kv.allocate(request, n):
                # Give back any prefix blocks it matched, so a waiting request holds no blocks.
                self.kv.free(request)
                request.num_computed_tokens = 0
                self.waiting.appendleft(request)
                break
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _start_load(self, request: Request) -> bool:
        """Decode instance: give the request blocks for its prompt and first token, then pull its KV
        (an n > 1 sibling shares its loaded leader's full prompt blocks and pulls only the rest)."""
        start = self._share_leader_blocks(request)
        if not self.kv.allocate(request, request.num_prompt_tokens + 1 - start):
            self.kv.free(request)
            request.num_computed_tokens = 0
            return False  # admission control: it waits (its KV stays on the prefill instance)
        assert self.connector is not None and request.kv_transfer is not None
        request.status = RequestStatus.RECEIVING
        if request.scheduled_time is None:
            request.scheduled_time = time.monotonic()
        self.receiving[request.request_id] = request
        self.connector.start_load(request.request_id, request.kv_transfer, request.block_ids,
                                  request.num_prompt_tokens, start)
        return True

    def _ready(self, request: Request) -> bool:
        """An n > 1 sibling waits until its leader has computed (or, on a decode instance, loaded)
        the prompt it will share."""
        leader = request.leader
        if leader is None or leader.finished:
            return True
        if leader.status == RequestStatus.RECEIVING:
            return False
        if leader.status != RequestStatus.RUNNING:
            return True
        return leader.num_computed_tokens >= leader.num_prompt_tokens

    def _attach_cached_prefix(self, request: Request) -> None:
        if not self._share_leader_blocks(request):
            self.kv.match_prefix(request)

    def _share_leader_blocks(self, request: Request) -> int:
        """An n > 1 sibling takes its leader's full prompt blocks, leaving at least one token to
        compute or load; returns the tokens they cover (0: no leader ready to share)."""
        leader = request.leader
        if (
            leader is None
            or leader.status != RequestStatus.RUNNING
            or leader.num_computed_tokens < leader.num_prompt_tokens
            or request.skip_prefix_cache
        ):
            return 0
        shareable = (request.num_tokens - 1) // self.kv.block_size
        return self.kv.share_prefix(request, leader, min(shareable, leader.num_prompt_tokens // self.kv.block_size))

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ----------------------------------------------------------------- update
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests; returns the finished."""
        finished: list[Request] = []
        for chunk in out.chunks:
            request = chunk.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(request)
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.append_token(token)
            status = request.check_stop()
            if status is not None:
                self.finish_request(request.request_id, status)
                finished.append(request)
        return finished
