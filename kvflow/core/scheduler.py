"""Token-budget scheduler: continuous batching, chunked prefill, preemption by recompute.

Each step hands every running request the tokens it still needs (one for a decode, a chunk for a
prompt), oldest first, until the step's token budget is spent; then admits waiting requests in
the order the queue policy gives. When the KV cache is full, the most recently admitted running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (prompt + output so far) later. Its output continues unchanged.

With `mixed_batching` off, a step that can admit a waiting prompt computes prompts only and the
running decodes wait for it (vLLM v0's scheduler, the colocated baseline of DistServe).

KV that is loaded rather than computed (from a prefill instance, from an offload tier) comes through
the engine's KV connector: a waiting request first takes the working pool's prefix hit; if the
connector can load KV past it, the request gets blocks, waits in `receiving` (holding no step) while
its KV arrives, and then runs like any other, from the first token the load did not cover.

Speculative decoding is the same rule with a longer chunk: a decoding request that holds proposals
(`Request.spec_token_ids`, from the runner's proposer) computes its last token and them in one
chunk; `update` then counts as computed only the last token and the accepted proposals, and gives
back the blocks of the rejected ones.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvflow.config import SchedulerConfig
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.kv_residency import KVResidency
from kvflow.core.policies import QueuePolicy, make_policy
from kvflow.core.request import Request, RequestStatus
from kvflow.kv_transfer.base import KVConnector, LoadResult, SentRecord
from kvflow.worker.step import RunnerOutput, ScheduledChunk, SpeContextResult

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests whose KV arrived since the last step and which came with new tokens (a decode
    # instance's first token): their outputs go out with this step's.
    loaded: list[Request] = field(default_factory=list)
    # Requests finished on admission with nothing to compute (prompt-only: a one-token prompt, an
    # n > 1 sibling): their outputs go out with this step's.
    finished: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class SpeContextStats:
    """SpeContext's sparse decodes so far (cumulative): how much of each selection was already in the
    buffer (kept) and how much moved in, in (KV head, token) pairs and in bytes."""

    steps: int = 0
    moved_tokens: int = 0
    kept_tokens: int = 0
    moved_bytes: int = 0
    recomputed_keys: int = 0

    def record(self, result: SpeContextResult) -> None:
        self.steps += 1
        self.moved_tokens += result.moved_tokens
        self.kept_tokens += result.kept_tokens
        self.moved_bytes += result.moved_bytes
        self.recomputed_keys += result.recomputed_keys


@dataclass
class SpecDecodeStats:
    """Speculative decoding so far (cumulative, like vLLM's `spec_decode_*` counters)."""

    num_drafts: int = 0  # verification steps of one request with at least one proposal
    num_draft_tokens: int = 0  # proposals verified
    num_accepted_tokens: int = 0  # proposals accepted
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts whose proposal j was accepted

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_proposed:
            self.accepted_per_position.extend([0] * (num_proposed - len(self.accepted_per_position)))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1


@dataclass
class SchedulerEvents:
    """What changed outside the steps' own outputs since the last `drain_events`."""

    # Blocks came back outside a step's own work (a pulled transfer, a cancelled or failed load),
    # so the KV-cache stats changed even if no request progressed.
    blocks_released: bool = False
    loads: list[LoadResult] = field(default_factory=list)  # finished KV loads
    sent: list[SentRecord] = field(default_factory=list)  # outgoing KV transfers acknowledged


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 connector: KVConnector | None = None, speculative: bool = False, lookahead: int = 0,
                 spec_token_budget: int = 0, max_loras: int = 0, residency: KVResidency | None = None) -> None:
        """`speculative`: the runner proposes tokens (speculative decoding) for requests that allow it;
        `lookahead`: cache entries a proposing request needs past its step's tokens (a draft model's KV
        for its proposals); `spec_token_budget`: proposals verified per step across the batch;
        `max_loras`: distinct LoRA adapters the running requests may use at once (the runner's slots);
        `residency`: SpeContext's memory model (`--kv-resident-memory`), which plans each step's moves of
        older KV to the offload tier."""
        self.config = config
        self.residency = residency
        self.max_loras = max_loras
        self.speculative = speculative
        self.lookahead = lookahead
        self.spec_token_budget = spec_token_budget
        self._per_request = 0  # this step's proposals per decoding request (`_proposals_per_request`)
        self.spec_stats = SpecDecodeStats()
        self.specontext_stats = SpeContextStats()
        self.kv = kv
        self.max_model_len = max_model_len
        self.connector = connector
        # Requests with blocks whose KV is being loaded, and aborted ones whose load has not
        # stopped yet (their blocks are freed when it has).
        self.receiving: dict[str, Request] = {}
        self.cancelling: dict[str, Request] = {}
        self.num_kv_load_failures = 0
        self.events = SchedulerEvents()
        self.policy: QueuePolicy = make_policy(config.policy, config)
        self.policy.attach(kv)
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
        self.policy.on_add(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (stop string, abort) a request wherever it is; frees its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.RECEIVING:
            # A thread is writing into its blocks: free them once it has stopped (`collect_loads`).
            del self.receiving[request_id]
            self.cancelling[request_id] = request
            request.status = status
            assert self.connector is not None
            self.connector.cancel_load(request_id)
            self.policy.on_finish(request)
            return request
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = status
        if not self._hand_over_blocks(request):
            self.kv.free(request)
        self.policy.on_finish(request)  # after its blocks went back: a policy may drop what nobody holds now
        return request

    def _hand_over_blocks(self, request: Request) -> bool:
        """The connector may keep a finished request's blocks (a prefill instance, until they are pulled)."""
        if self.connector is None or not self.connector.request_finished(request):
            return False
        self.kv.detach(request)  # the connector gives them back through `collect`
        return True

    def collect_loads(self, out: SchedulerOutput) -> None:
        """Free blocks the connector is done with; admit requests whose KV arrived (or fell back)."""
        if self.connector is None:
            return
        events = self.connector.collect()
        self.events.sent.extend(events.sent)
        for block_ids in events.release:
            self.kv.release(block_ids)
            self.events.blocks_released = True
        for result in events.loaded:
            request = self.cancelling.pop(result.request_id, None)
            if request is not None:
                self.kv.free(request)
                self.events.blocks_released = True
                continue
            request = self.receiving.pop(result.request_id, None)
            if request is None:
                continue
            num_outputs = request.num_output_tokens
            if not result.ok or not self.connector.finish_load(request, result):
                # The KV is gone (its source died, timed out, aborted), or came without what the
                # request asked for: compute the prompt here.
                logger.warning("KV load for %s failed (%s); computing its prompt here", request.request_id,
                               result.error or "incomplete transfer")
                self.num_kv_load_failures += 1
                self.kv.free(request)
                self.events.blocks_released = True
                request.num_computed_tokens = 0  # an n > 1 sibling may have shared its leader's blocks
                request.kv_transfer = None
                request.status = RequestStatus.WAITING
                self.waiting.appendleft(request)
                continue
            self.events.loads.append(result)
            request.kv_transfer = None
            request.num_computed_tokens = result.num_tokens
            self.kv.cache_full_blocks(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.num_output_tokens > num_outputs:
                out.loaded.append(request)
                status = request.check_stop()
                if status is not None:
                    self.finish_request(request.request_id, status)

    def drain_events(self) -> SchedulerEvents:
        """The events since the last call (the engine reports them with its stats)."""
        events, self.events = self.events, SchedulerEvents()
        return events

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = self._schedule()
        if self.residency is not None:
            self.residency.plan(out.chunks)
        return out

    def _schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.collect_loads(out)
        self._per_request = self._proposals_per_request()
        budget = self.config.max_num_batched_tokens
        if not self.config.mixed_batching and self.waiting and not out.loaded:
            self._admit_waiting(out, budget)  # prompts alone, if any can start
            if out.chunks:
                return out
        chunked = self.config.enable_chunked_prefill

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = request.num_tokens_to_compute - request.num_computed_tokens
            proposals = self._proposals(request, remaining, min(budget, 1 + self._per_request))
            if proposals and self._allocate(request, 1 + len(proposals)):
                out.chunks.append(self._chunk(request, 1 + len(proposals), proposals, request.spec_draft_probs))
                budget -= 1 + len(proposals)
                i += 1
                continue  # (without room for its proposals, it decodes one token as usual)
            n = self._chunk_tokens(request, min(remaining, budget))
            if n < remaining and not chunked:
                i += 1
                continue
            while not self._allocate(request, n):
                if self.policy.relieve_memory():
                    continue  # the policy's pinned blocks came back first
                if self.running[-1] is request and len(self.running) == 1 and self._outgrows_cache(request, n):
                    # Alone, it still does not fit: its context has outgrown the whole KV cache. Preempted, it
                    # would be recomputed and preempted again forever; it ends here, as at max_model_len.
                    logger.warning("request %s needs more KV blocks than the cache has (%d) after %d tokens: "
                                   "finished (length)", request.request_id, self.kv.num_blocks, request.num_tokens)
                    self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                    out.finished.append(request)
                    break
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            out.chunks.append(self._chunk(request, n))
            budget -= n
            i += 1

        # A step that had to preempt admits nobody: the cache is already too small.
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        chunked = self.config.enable_chunked_prefill
        skipped: list[Request] = []
        adapters = {r.lora.key for r in self.running if r.lora is not None}
        held: list[bool] = [False]  # a LoRA request waits for a slot: adapter requests behind it wait too
        while self.waiting and budget > 0 and self._may_admit_more():
            request = self.policy.pop_next(self.waiting)
            memory = self._memory_admission()  # (popping may have planned a batch)
            if not self._ready(request) or not self.policy.ready(request) or not self._adapter_fits(
                    request, adapters, held):
                skipped.append(request)
                continue
            if request.num_computed_tokens >= request.num_tokens_to_compute:
                self._finish_uncomputed(request, out)
                continue
            if request.num_computed_tokens == 0:
                self._attach_cached_prefix(request)
            if self.connector is not None:
                to_load = self.connector.num_tokens_to_load(request)
                if to_load > request.num_computed_tokens:
                    if not self._start_load(request, to_load, memory):
                        self.waiting.appendleft(request)
                        break
                    continue
            remaining = request.num_tokens_to_compute - request.num_computed_tokens
            n = self._chunk_tokens(request, min(remaining, budget))
            if (n < remaining and not chunked) or not self._within_watermark(request, n, memory) or \
                    not self._allocate(request, n):
                # Give back any prefix blocks it matched, so a waiting request holds no blocks.
                self.kv.free(request)
                request.num_computed_tokens = 0
                self.waiting.appendleft(request)
                if not self._num_admitted and self.policy.relieve_memory():
                    continue  # nothing runs to free blocks: the policy's pins must, or no step ever comes
                break
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            if request.lora is not None:
                adapters.add(request.lora.key)
            self.running.append(request)
            out.chunks.append(self._chunk(request, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _adapter_fits(self, request: Request, adapters: set[str], held: list[bool]) -> bool:
        """A request for a LoRA adapter that no running request uses waits while every slot is taken: it is
        passed over, never refused. Requests behind it for the base model go ahead; those for adapters
        wait too (`held`), so the running adapters drain and free a slot for it instead of keeping
        every slot busy with newer requests forever."""
        lora = request.lora
        if lora is None:
            return True
        if held[0] or (lora.key not in adapters and len(adapters) >= self.max_loras):
            held[0] = True
            return False
        return True

    def _finish_uncomputed(self, request: Request, out: SchedulerOutput) -> None:
        """A prompt-only request that needs no KV (its prompt is one token, or it is an n > 1 sibling,
        whose leader reports the prompt logprobs) is done as soon as it is admitted: no blocks, no step."""
        if request.scheduled_time is None:
            request.scheduled_time = time.monotonic()
        self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
        out.finished.append(request)

    # Admission: by running sequences (max_num_seqs, vLLM's rule) or by KV memory (BatchLLM's
    # memory-centric token batching: as many sequences as the cache holds, so decode-heavy steps carry
    # larger batches, with a watermark of free blocks left for the running requests' growth).
    @property
    def _num_admitted(self) -> int:
        return len(self.running) + len(self.receiving)

    def _may_admit_more(self) -> bool:
        return self._memory_admission() or self._num_admitted < self.config.max_num_seqs

    def _memory_admission(self) -> bool:
        rule = self.config.admission
        return rule == "memory" or (rule == "auto" and self.policy.memory_admission)

    def _within_watermark(self, request: Request, n: int, memory: bool) -> bool:
        """Memory admission: the cache keeps `kv_watermark` of its blocks free after this request's first
        chunk (always true for the first running request, which must be able to start)."""
        if not memory or not self.running:
            return True
        free_after = self.kv.num_free_blocks - self.kv.pages_needed(request, n)
        return free_after >= self.config.kv_watermark * self.kv.num_blocks

    # The KV policy's seam (kv_policy.py): chunk sizes, spare blocks, the runner's work, eviction.
    @staticmethod
    def _chunk_tokens(request: Request, n: int) -> int:
        return n if request.kv_policy is None else request.kv_policy.chunk_tokens(request, n)

    def _allocate(self, request: Request, n: int) -> bool:
        spare = 0 if request.kv_policy is None else request.kv_policy.spare_blocks(request, n)
        if (self.lookahead and self._may_speculate(request) and request.num_computed_tokens + n >= request.num_tokens
                and self.kv.allocate(request, n + self.lookahead, spare)):
            return True  # room for the draft's KV of its next proposals too (else it proposes nothing)
        return self.kv.allocate(request, n, spare)

    def _outgrows_cache(self, request: Request, n: int) -> bool:
        """Whether `n` more tokens of the request need more blocks than the whole pool has."""
        spare = 0 if request.kv_policy is None else request.kv_policy.spare_blocks(request, n)
        tokens = request.num_computed_tokens - request.kv_shift + n
        return self.kv.blocks_needed(tokens) * self.kv.layer_groups + spare > self.kv.num_blocks

    def _chunk(self, request: Request, n: int, proposals: list[int] | None = None,
               draft_probs: torch.Tensor | None = None) -> ScheduledChunk:
        start = request.num_computed_tokens
        op = None if request.kv_policy is None else request.kv_policy.op(request, start, n)
        slot = -1 if request.kv_residual_slot is None else request.kv_residual_slot
        ring_shift, request.kv_ring_shift = request.kv_ring_shift, 0  # the runner rotates the ring this step
        k = len(proposals or [])
        probs = None if draft_probs is None or not k else draft_probs[:k]
        room = len(request.block_ids) * self.kv.block_size - (start + n - request.kv_shift)
        # Propose what the adaptive rule lets a step verify now: nothing past its batch size (a draft
        # model's steps cost too).
        propose = self._per_request if self._may_speculate(request) and room >= self.lookahead else 0
        return ScheduledChunk(request, start, n, request.kv_shift, op, slot, request.kv_prefix_floor, ring_shift,
                              proposals or [], probs, propose)

    # Speculative decoding's seam: who gets proposals, how many are verified, what is kept.
    def _may_speculate(self, request: Request) -> bool:
        """Requests whose KV a policy keeps or scores, a prefill instance's (one token) and prompt-only ones
        (nothing sampled) are not speculated on; a request may opt out (`SamplingParams.speculative`)."""
        return (self.speculative and request.params.speculative and request.kv_policy is None
                and request.kv_transfer is None and not request.prompt_only)

    def _proposals_per_request(self) -> int:
        """The adaptive rule (SpeculativeConfig.speculative_token_budget): B requests that may speculate
        verify at most budget // B proposals each, so a large batch turns speculation down, then off
        (and back on as the batch shrinks). B counts every such request running or waiting, not only
        those decoding now: one still in prefill or in the queue decodes soon, and speculating for the
        first few of a large batch only to stop makes a draft catch up over their prompts for nothing
        (measured: the draft at batch 16 and 64 ran at 0.85-0.87x when B counted decoding requests)."""
        if not self.speculative:
            return 0
        batch = sum(1 for r in (*self.running, *self.waiting) if self._may_speculate(r))
        return self.spec_token_budget // max(1, batch)

    def _proposals(self, request: Request, remaining: int, budget: int) -> list[int]:
        """The proposals a decoding request verifies this step: as many as fit the step's budget, its
        output cap (the step emits the accepted ones and one more) and the context."""
        if remaining != 1 or not request.spec_token_ids:
            return []
        room = min(budget - 1, request.max_output_tokens - request.num_output_tokens - 1,
                   self.max_model_len - request.num_tokens)
        return request.spec_token_ids[:max(0, room)]

    def _start_load(self, request: Request, num_tokens: int, memory: bool = False) -> bool:
        """Give the request blocks for the tokens to load and the next one, then start the load of those
        after the ones it has (a prefix hit, or an n > 1 sibling's share of its loaded leader's blocks).
        `memory`: admission by KV memory, whose watermark a load respects like a computed prompt."""
        start = request.num_computed_tokens
        if not self._within_watermark(request, num_tokens + 1 - start, memory) or \
                not self.kv.allocate(request, num_tokens + 1 - start):
            self.kv.free(request)
            request.num_computed_tokens = 0
            return False  # admission control: it waits (its KV stays where it is)
        assert self.connector is not None
        request.status = RequestStatus.RECEIVING
        if request.scheduled_time is None:
            request.scheduled_time = time.monotonic()
        self.receiving[request.request_id] = request
        self.connector.start_load(request, start)
        return True

    def _ready(self, request: Request) -> bool:
        """An n > 1 sibling waits until its leader has computed (or loaded) the prompt it will share; a
        prompt-only sibling, until its leader has finished."""
        leader = request.leader
        if leader is None or leader.finished:
            return True
        if request.prompt_only:
            return False  # it computes nothing: it finishes after the leader, whose output carries the prompt logprobs
        if leader.status == RequestStatus.RECEIVING:
            return False
        if leader.status != RequestStatus.RUNNING:
            return True
        return leader.num_computed_tokens >= leader.num_prompt_tokens

    def _attach_cached_prefix(self, request: Request) -> None:
        if not self._share_leader_blocks(request):
            policy = request.kv_policy
            self.kv.match_prefix(request, 1 if policy is None else policy.min_final_chunk())

    def _share_leader_blocks(self, request: Request) -> int:
        """An n > 1 sibling takes its leader's full prompt blocks, leaving at least one token to
        compute or load; returns the tokens they cover (0: no leader ready to share)."""
        leader = request.leader
        if (
            leader is None
            or leader.status != RequestStatus.RUNNING
            or leader.num_computed_tokens < leader.num_prompt_tokens
            or request.skip_prefix_cache
            or leader.kv_altered  # its blocks are no longer the prompt's exact KV
            # SnapKV must compute its observation window itself; the leader's blocks would cover it.
            or (request.kv_policy is not None and request.kv_policy.min_final_chunk() > 1)
        ):
            return 0
        shareable = (request.num_tokens - 1) // self.kv.block_size
        return self.kv.share_prefix(request, leader, min(shareable, leader.num_prompt_tokens // self.kv.block_size))

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids, request.spec_draft_probs, request.spec_draft_computed = [], None, 0
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ----------------------------------------------------------------- update
    def update(self, out: SchedulerOutput, result: RunnerOutput) -> dict[str, int]:
        """Advance computed counts, append each request's sampled tokens up to its first stop, finish
        requests. Returns how many of its sampled tokens each request kept."""
        kept: dict[str, int] = {}
        for done in result.kv_specontext.values():
            self.specontext_stats.record(done)
        for chunk in out.chunks:
            request = chunk.request
            assert isinstance(request, Request)
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            tokens = result.sampled.get(request.request_id)
            proposed = len(chunk.spec_token_ids)
            if proposed:  # the last token's KV and the accepted proposals' are kept; the rest is rolled back
                accepted = len(tokens) - 1 if tokens else 0
                request.num_computed_tokens += chunk.num_tokens - proposed + accepted
                self.spec_stats.record(proposed, accepted)
            else:
                request.num_computed_tokens += chunk.num_tokens
            cached_before = self.kv.num_cached_blocks(request)
            self.kv.cache_full_blocks(request)
            cached = self.kv.num_cached_blocks(request)
            if cached > cached_before:
                self.policy.on_blocks_cached(request, cached)
            if request.kv_policy is not None:
                request.kv_policy.after_step(request, self.kv, chunk, result)
            if request.prompt_only and request.num_computed_tokens >= request.num_tokens_to_compute:
                # Its prompt logprobs are scored (this step's chunk never reached the last token, so
                # nothing was sampled): done, its blocks go back now.
                self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                continue
            if not tokens:
                continue
            logprobs = result.logprobs.get(request.request_id)
            status = None
            for i, token in enumerate(tokens):
                request.append_token(token, logprobs[i] if logprobs is not None else None)
                kept[request.request_id] = i + 1
                status = request.check_stop()
                if status is not None:
                    break
            if status is not None:
                self.finish_request(request.request_id, status)
                continue
            if proposed or chunk.propose:
                self.kv.trim(request)  # the rejected proposals' blocks, and the draft's lookahead, go back
            rid = request.request_id
            request.spec_token_ids = result.spec_token_ids.get(rid, [])
            request.spec_draft_probs = result.spec_draft_probs.get(rid)
            request.spec_draft_computed = result.spec_draft_computed.get(rid, request.spec_draft_computed)
        return kept
