"""Waiting-queue policies: which waiting request the scheduler considers next.

The scheduler owns the queue (a deque whose front holds preempted requests, which must resume
first); a policy only chooses. It sees each request's life (`on_add`, `on_blocks_cached`,
`on_finish`) and may read the prefix cache (`attach` gives it the KV cache manager, whose
`cached_prefix_tokens` looks a request's prompt up without taking anything), so a prefix-aware
or prefix-tree policy is a policy here, not a fork of the scheduler. It may hold a request back
(`ready`: a group member waits for its group's prefix) and say that admission should be limited by
the KV cache alone for now (`memory_admission`, SchedulerConfig.admission "auto").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvflow.config import QUEUE_POLICIES, SchedulerConfig
from kvflow.core.prefix_tree import plan_prefix_groups
from kvflow.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from kvflow.core.kv_cache_manager import KVCacheManager


class QueuePolicy:
    """Base policy: first come, first served, and no interest in events."""

    def attach(self, kv: KVCacheManager) -> None:
        """The cache manager whose prefix index the policy may read (never change)."""
        self.kv = kv

    def on_add(self, request: Request) -> None:
        """A request joined the waiting queue."""

    def on_blocks_cached(self, request: Request, num_cached_blocks: int) -> None:
        """More of a running request's blocks are full and in the prefix index."""

    def on_finish(self, request: Request) -> None:
        """A request left the engine (finished, stopped or aborted)."""

    def pop_next(self, waiting: deque[Request]) -> Request:
        return waiting.popleft()

    def ready(self, request: Request) -> bool:
        """Whether a popped request may start now (if not, the scheduler tries the next one)."""
        return True

    @property
    def memory_admission(self) -> bool:
        """Whether admission should be limited by the KV cache rather than max_num_seqs now."""
        return False

    def relieve_memory(self) -> bool:
        """The cache is too full for the scheduler to make progress: give back any blocks the policy
        holds (pinned prefixes). True if some came back (the scheduler then tries again)."""
        return False


class FCFSPolicy(QueuePolicy):
    """First come, first served (preempted requests were put back at the front)."""


class PriorityPolicy(QueuePolicy):
    """Lowest `priority` value first, then arrival; preempted requests still resume first."""

    def pop_next(self, waiting: deque[Request]) -> Request:
        if waiting[0].status == RequestStatus.PREEMPTED:
            return waiting.popleft()
        best = min(waiting, key=lambda r: (r.priority, r.arrival_time))
        waiting.remove(best)
        return best


class LongestPrefixPolicy(QueuePolicy):
    """Longest cached prefix first (SGLang's "lpm"): the request whose prompt the prefix cache holds
    the most of runs next, while those blocks are still cached; ties go to the earlier arrival, and
    preempted requests still resume first. Past `max_scan` waiting requests, first come first served:
    the scan costs a prefix lookup per waiting request.

    Starvation bound: the oldest waiting request is passed over at most `max_skips` times, then taken
    next whatever the cache holds; so a request k places from the front starts within about
    k * (max_skips + 1) admissions, however many prefix hits keep arriving behind it."""

    max_scan = 128

    def __init__(self, max_skips: int = 32) -> None:
        self.max_skips = max_skips
        self._oldest: Request | None = None
        self._skips = 0

    def pop_next(self, waiting: deque[Request]) -> Request:
        oldest = waiting[0]
        if oldest.status == RequestStatus.PREEMPTED or len(waiting) > self.max_scan:
            return waiting.popleft()
        if oldest is not self._oldest:
            self._oldest, self._skips = oldest, 0
        if self._skips >= self.max_skips:
            return waiting.popleft()
        best = max(waiting, key=lambda r: (self.kv.cached_prefix_tokens(r), -r.arrival_time))
        if best is not oldest:
            self._skips += 1
        waiting.remove(best)
        return best


@dataclass(eq=False)
class _Group:
    """One prefix group of a planned batch: its members share `prefix_blocks` full blocks of prompt."""

    prefix_blocks: int
    tokens: tuple[int, ...]  # the shared prefix
    remaining: int  # members not finished
    leader: Request | None = None  # the member computing the prefix (before it is pinned)
    pinned: list[int] | None = None  # the prefix's blocks, held by the policy until the last member ends


@dataclass
class PrefixTreeStats:
    """What the prefix-tree plans of this engine found (cumulative over its planned batches)."""

    batches: int = 0
    groups: int = 0  # groups sharing at least one block
    logical_prefix_tokens: int = 0
    processed_prefix_tokens: int = 0
    optimal_processed_tokens: int = 0

    @property
    def saving_ratio(self) -> float:
        """BatchLLM's R_saving over the planned batches: 1 - processed / logical prefix tokens."""
        return 1.0 - self.processed_prefix_tokens / self.logical_prefix_tokens if self.logical_prefix_tokens else 0.0

    @property
    def optimal_saving_ratio(self) -> float:
        return 1.0 - self.optimal_processed_tokens / self.logical_prefix_tokens if self.logical_prefix_tokens else 0.0


class PrefixTreePolicy(QueuePolicy):
    """BatchLLM's group scheduling for requests that arrive together (an offline batch).

    When the queue has new requests, at least `min_batch` of them (fewer: first come, first served),
    they are planned at once (`plan_prefix_groups`: a prefix tree cut to one shared level, per cache
    salt) and the queue is reordered:
    - **groups**: a group's first member to start (its leader) computes the shared prefix; the others
      wait (`ready`) until those blocks are cached, then take them from the prefix cache, so the prefix
      is computed once. The policy then pins the blocks (a reference of its own), so they stay cached
      between members, and unpins them when the group's last member ends, evicting them at once
      instead of leaving them to LRU (except leading blocks a group still to start shares). While
      members wait, the leaders of the next groups start, so several prefixes may be pinned at once;
      when the cache is then too full for any progress, the scheduler asks for them back
      (`relieve_memory`: unpinned to the LRU order, members start from what is still cached).
    - **decode-ratio order**: groups whose requests spend the larger share of their tokens decoding
      start first, so their long decodes overlap the later groups' prefill chunks (mixed batching).
      A request's output length is its `max_tokens`, or the mean output of earlier requests of the
      same prefix when there are any (the history).
    - **memory admission**: while planned requests remain, `memory_admission` is on, so with
      SchedulerConfig.admission "auto" the running set is bounded by the KV cache, not max_num_seqs.
    Requests planned earlier keep their place ahead of a new plan (first come, first served between
    batches), and preempted requests still resume first.
    """

    def __init__(self, min_batch: int = 1) -> None:
        self.min_batch = min_batch
        self.stats = PrefixTreeStats()
        self._new: list[Request] = []
        self._groups: dict[str, _Group] = {}  # request id -> its group (groups sharing >= 1 block)
        self._planned = 0  # planned requests not finished
        self._planned_ids: set[str] = set()
        self._history: dict[int, tuple[int, int]] = {}  # prefix key -> (outputs seen, their tokens)

    def on_add(self, request: Request) -> None:
        self._new.append(request)

    def pop_next(self, waiting: deque[Request]) -> Request:
        if self._new:
            self._plan(waiting)
        return waiting.popleft()

    @property
    def memory_admission(self) -> bool:
        return self._planned > 0

    # ----------------------------------------------------------------- planning
    def _plan(self, waiting: deque[Request]) -> None:
        queued = {id(r) for r in waiting}
        new = [r for r in self._new if id(r) in queued and r.status == RequestStatus.WAITING]
        self._new = []
        if len(new) < self.min_batch or not self.kv.enable_prefix_caching:
            return
        # Requests share KV only within a cache salt, and only where their blocks stay the prompt's exact
        # KV and are indexed (no KV policy, prefix caching not skipped): the others are planned alone. In a
        # cache of layer groups, the top group's salt: the same there means the same KV in every layer.
        by_salt: dict[tuple[bool, str | None], list[Request]] = {}
        top = self.kv.layer_groups - 1
        for r in new:
            shares = not r.skip_prefix_cache and r.kv_policy is None
            by_salt.setdefault((shares, self.kv.salt(r, top)), []).append(r)
        arrival = {id(r): i for i, r in enumerate(new)}
        ordered: list[tuple[float, int, list[Request]]] = []
        for (shares, _), requests in by_salt.items():
            ordered.extend(self._plan_salt(requests, shares, arrival))
        ordered.sort(key=lambda item: (-item[0], item[1]))
        planned = [r for _, _, members in ordered for r in members]
        moved = {id(r) for r in planned}
        rest = [r for r in waiting if id(r) not in moved]
        waiting.clear()
        waiting.extend(rest + planned)
        self._planned += len(planned)
        self._planned_ids.update(r.request_id for r in planned)
        self.stats.batches += 1

    def _plan_salt(self, requests: list[Request], shares: bool,
                   arrival: dict[int, int]) -> list[tuple[float, int, list[Request]]]:
        """The groups of requests of one cache salt, each with its decode ratio and first arrival."""
        block_size = self.kv.block_size
        if shares:
            plan = plan_prefix_groups([r.prompt_token_ids for r in requests], block_size)
            self.stats.logical_prefix_tokens += plan.logical_prefix_tokens
            self.stats.processed_prefix_tokens += plan.processed_prefix_tokens
            self.stats.optimal_processed_tokens += plan.optimal_processed_tokens
            groups = [(g.prefix_len, g.members) for g in plan.groups]
        else:
            groups = [(0, (i,)) for i in range(len(requests))]
        out = []
        for prefix_len, indices in groups:
            members = [requests[i] for i in indices]
            key = hash(tuple(members[0].prompt_token_ids[:prefix_len]))
            ratios = {id(r): self._decode_ratio(r, prefix_len, len(members), key) for r in members}
            members.sort(key=lambda r: -ratios[id(r)])
            if prefix_len >= block_size and len(members) > 1:
                group = _Group(prefix_len // block_size, tuple(members[0].prompt_token_ids[:prefix_len]), len(members))
                self._groups.update((r.request_id, group) for r in members)
                self.stats.groups += 1
            out.append((sum(ratios.values()) / len(members), min(arrival[id(r)] for r in members), members))
        return out

    def _decode_ratio(self, request: Request, prefix_len: int, group_size: int, key: int) -> float:
        """Decode tokens over all tokens the request costs (its share of the group's prefix counted once)."""
        seen = self._history.get(key)
        output = seen[1] / seen[0] if seen else request.max_output_tokens
        prefill = request.num_prompt_tokens - prefix_len + prefix_len / group_size
        return output / max(1.0, output + prefill)

    # ----------------------------------------------------------------- groups
    def ready(self, request: Request) -> bool:
        group = self._groups.get(request.request_id)
        if group is None or group.pinned is not None:
            return True
        if group.leader is None or group.leader is request:
            group.leader = request
            return True
        leader = group.leader
        if leader.num_computed_tokens < group.prefix_blocks * self.kv.block_size:
            return False  # (no lookup until the leader has the prefix: this runs for every waiting member)
        if self._pin(group, request):  # (or the leader found it cached: no new block to report)
            return True
        if leader.num_computed_tokens >= leader.num_prompt_tokens:
            group.pinned = []  # its prompt is computed but not shareable (e.g. KIVI's ring): nothing to wait for
            return True
        return False

    def on_blocks_cached(self, request: Request, num_cached_blocks: int) -> None:
        group = self._groups.get(request.request_id)
        if group is not None and group.pinned is None and num_cached_blocks >= group.prefix_blocks:
            self._pin(group, request)

    def _pin(self, group: _Group, request: Request) -> bool:
        group.pinned = self.kv.pin_prefix(request, group.prefix_blocks)
        return group.pinned is not None

    def on_finish(self, request: Request) -> None:
        if request.request_id in self._planned_ids:
            self._planned_ids.discard(request.request_id)
            self._planned -= 1
        group = self._groups.pop(request.request_id, None)
        if group is None:
            return
        group.remaining -= 1
        if request.status != RequestStatus.FINISHED_ABORTED:
            key = hash(group.tokens)
            count, tokens = self._history.get(key, (0, 0))
            self._history[key] = (count + 1, tokens + request.num_output_tokens)
        if group.leader is request and group.pinned is None:
            group.leader = None  # another member computes the prefix
        if group.remaining == 0 and group.pinned:
            # Evicted at once, except the leading blocks a group still to pin shares (an outer prefix,
            # a system prompt): those go back to the cache's LRU order for that group's leader to find.
            waiting = {id(g): g for g in self._groups.values() if g.pinned is None}.values()
            keep = max((_common_blocks(group, g, self.kv.block_size) for g in waiting), default=0)
            self.kv.unpin(group.pinned, keep=keep)
            group.pinned = None

    def relieve_memory(self) -> bool:
        """Unpin every group's prefix (to the cache's LRU order, not evicted): pins are an optimisation
        and must never stop the engine, e.g. when every group's leader has pinned its prefix and no
        member's first chunk fits beside them. Members then start from whatever is still cached."""
        pinned = {id(g): g for g in self._groups.values() if g.pinned}
        for group in pinned.values():
            self.kv.unpin(group.pinned, keep=group.prefix_blocks)
            group.pinned = []
        return bool(pinned)


def _common_blocks(a: _Group, b: _Group, block_size: int) -> int:
    """Leading whole blocks two groups' prefixes share."""
    n, limit = 0, min(len(a.tokens), len(b.tokens))
    while n < limit and a.tokens[n] == b.tokens[n]:
        n += 1
    return n // block_size


POLICIES: dict[str, type[QueuePolicy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy,
                                          "lpm": LongestPrefixPolicy}
assert tuple(POLICIES) == QUEUE_POLICIES, "kvflow.config.QUEUE_POLICIES names the policies defined here"


def make_policy(name: str, config: SchedulerConfig | None = None) -> QueuePolicy:
    """The queue policy `name` (SchedulerConfig.policy), or, where `config` groups batches by prefix
    (batch_policy prefix-tree, or auto), BatchLLM's PrefixTreePolicy, which orders the queue itself."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    if config is not None and config.groups_batches:
        min_batch = 1 if config.batch_policy == "prefix-tree" else config.prefix_tree_min_batch
        return PrefixTreePolicy(min_batch)
    if name == "lpm":
        return LongestPrefixPolicy(config.starvation_limit if config is not None else 32)
    return POLICIES[name]()
