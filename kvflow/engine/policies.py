"""Waiting-queue policies: which waiting request the scheduler considers next.

The scheduler owns the queue (a deque whose front holds preempted requests, which must resume
first); a policy only chooses. New policies (prefix-aware, batch-prefix groups) plug in here.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from kvflow.engine.request import Request, RequestStatus


class QueuePolicy(Protocol):
    def pop_next(self, waiting: deque[Request]) -> Request: ...


class FCFSPolicy:
    """First come, first served (preempted requests were put back at the front)."""

    def pop_next(self, waiting: deque[Request]) -> Request:
        return waiting.popleft()


class PriorityPolicy:
    """Lowest `priority` value first, then arrival; preempted requests still resume first."""

    def pop_next(self, waiting: deque[Request]) -> Request:
        if waiting[0].status == RequestStatus.PREEMPTED:
            return waiting.popleft()
        best = min(waiting, key=lambda r: (r.priority, r.arrival_time))
        waiting.remove(best)
        return best


POLICIES = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}


def make_policy(name: str) -> QueuePolicy:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name]()
