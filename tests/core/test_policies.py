"""Queue policies: the order each gives (against naive references), and the events they see."""

from __future__ import annotations

import random
from collections import deque

import pytest

from kvflow.config import QUEUE_POLICIES, SchedulerConfig
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.policies import POLICIES, LongestPrefixPolicy, PriorityPolicy, QueuePolicy, make_policy
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import RunnerOutput


def req(rid: str, tokens: list[int], priority: int = 0, arrival: float = 0.0) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=2), arrival_time=arrival, priority=priority)


def drain(policy: QueuePolicy, waiting: list[Request]) -> list[str]:
    queue = deque(waiting)
    order = []
    while queue:
        order.append(policy.pop_next(queue).request_id)
    return order


def test_names_and_classes_agree():
    assert tuple(POLICIES) == QUEUE_POLICIES
    with pytest.raises(ValueError, match="policy must be one of fcfs, priority, lpm"):
        make_policy("sjf")
    with pytest.raises(ValueError, match="policy must be one of"):
        SchedulerConfig(policy="sjf")


def test_fcfs_keeps_queue_order():
    waiting = [req(f"r{i}", [i], arrival=10 - i) for i in range(5)]
    assert drain(make_policy("fcfs"), waiting) == ["r0", "r1", "r2", "r3", "r4"]


def test_priority_lowest_value_first_then_arrival_and_preempted_resume_first():
    rng = random.Random(0)
    waiting = [req(f"r{i}", [i], priority=rng.randrange(3), arrival=rng.random()) for i in range(30)]
    expected = [r.request_id for r in sorted(waiting, key=lambda r: (r.priority, r.arrival_time))]
    assert drain(PriorityPolicy(), waiting) == expected
    preempted = req("p", [1], priority=9, arrival=99.0)
    preempted.status = RequestStatus.PREEMPTED
    assert drain(PriorityPolicy(), [preempted, req("a", [2], priority=0)]) == ["p", "a"]


def naive_cached_prefix(tokens: list[int], cached: list[list[int]], block_size: int) -> int:
    """Longest whole-block prefix of `tokens` (leaving one token) that some computed sequence shares."""
    best = 0
    for other in cached:
        n = 0
        while n < min(len(tokens) - 1, len(other)) and tokens[n] == other[n]:
            n += 1
        best = max(best, n // block_size * block_size)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_lpm_takes_the_longest_cached_prefix_first(seed: int):
    rng = random.Random(seed)
    block_size = 4
    kv = KVCacheManager(num_blocks=256, block_size=block_size)
    bases = [[rng.randrange(50) for _ in range(24)] for _ in range(3)]
    computed = []
    for i, base in enumerate(bases[:2]):  # two prompts in the cache, a third never computed
        r = req(f"cached{i}", base)
        kv.allocate(r, r.num_tokens)
        r.num_computed_tokens = r.num_tokens
        kv.cache_full_blocks(r)
        computed.append(base)
    waiting = []
    for i in range(12):
        base = bases[rng.randrange(3)]
        keep = rng.randrange(0, 25)
        waiting.append(req(f"w{i}", base[:keep] + [100 + i] * rng.randrange(1, 6), arrival=rng.random()))
    policy = LongestPrefixPolicy()
    policy.attach(kv)
    free_before = kv.num_free_blocks
    order = drain(policy, waiting)
    by_id = {r.request_id: r for r in waiting}
    expected = sorted(waiting, key=lambda r: (-naive_cached_prefix(r.all_token_ids, computed, block_size),
                                              r.arrival_time))
    assert order == [r.request_id for r in expected]
    assert [kv.cached_prefix_tokens(by_id[rid]) for rid in order] == sorted(
        (naive_cached_prefix(r.all_token_ids, computed, block_size) for r in waiting), reverse=True)
    assert kv.num_free_blocks == free_before  # looking took nothing


def test_lpm_falls_back_to_fcfs_on_a_long_queue_and_resumes_preempted_first():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    policy = LongestPrefixPolicy()
    policy.attach(kv)
    policy.max_scan = 3
    assert drain(policy, [req(f"r{i}", [i, i, i, i, i]) for i in range(5)])[:2] == ["r0", "r1"]
    preempted = req("p", [1, 2])
    preempted.status = RequestStatus.PREEMPTED
    assert drain(policy, [preempted, req("a", [3])]) == ["p", "a"]


class RecordingPolicy(QueuePolicy):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def on_add(self, request: Request) -> None:
        self.events.append(("add", request.request_id, 0))

    def on_blocks_cached(self, request: Request, num_cached_blocks: int) -> None:
        self.events.append(("cached", request.request_id, num_cached_blocks))

    def on_finish(self, request: Request) -> None:
        self.events.append(("finish", request.request_id, 0))


def test_the_scheduler_tells_its_policy_about_each_request():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=6), kv, max_model_len=64)
    policy = RecordingPolicy()
    policy.attach(kv)
    scheduler.policy = policy
    scheduler.add_request(Request("a", list(range(9)), SamplingParams(max_tokens=2)))
    scheduler.add_request(Request("b", list(range(50, 53)), SamplingParams(max_tokens=8)))
    while scheduler.num_unfinished:
        out = scheduler.schedule()
        scheduler.update(out, RunnerOutput(sampled={c.request.request_id: [7] for c in out.chunks if c.samples}))
        if scheduler.num_unfinished == 1 and "b" in scheduler.requests:
            scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert policy.events[:2] == [("add", "a", 0), ("add", "b", 0)]
    # a: 6 tokens computed in the first step (1 full block), its whole prompt of 9 in the second (2).
    assert ("cached", "a", 1) in policy.events and ("cached", "a", 2) in policy.events
    assert policy.events.index(("cached", "a", 1)) < policy.events.index(("cached", "a", 2))
    assert sorted(e for e in policy.events if e[0] == "finish") == [("finish", "a", 0), ("finish", "b", 0)]
