"""Waiting-queue policies: which waiting request the scheduler considers next.

The scheduler owns the queue (a deque whose front holds preempted requests, which must resume
first); a policy only chooses. It sees each request's life (`on_add`, `on_blocks_cached`,
`on_finish`) and may read the prefix cache (`attach` gives it the KV cache manager, whose
`cached_prefix_tokens` looks a request's prompt up without taking anything), so a prefix-aware
or prefix-tree policy is a policy here, not a fork of the scheduler.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from kvflow.config import QUEUE_POLICIES
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
    the scan costs a prefix lookup per waiting request."""

    max_scan = 128

    def pop_next(self, waiting: deque[Request]) -> Request:
        if waiting[0].status == RequestStatus.PREEMPTED or len(waiting) > self.max_scan:
            return waiting.popleft()
        best = max(waiting, key=lambda r: (self.kv.cached_prefix_tokens(r), -r.arrival_time))
        waiting.remove(best)
        return best


POLICIES: dict[str, type[QueuePolicy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy,
                                          "lpm": LongestPrefixPolicy}
assert tuple(POLICIES) == QUEUE_POLICIES, "kvflow.config.QUEUE_POLICIES names the policies defined here"


def make_policy(name: str) -> QueuePolicy:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name]()
