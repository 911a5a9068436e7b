"""BatchLLM's group scheduling (kvflow/core/policies.py, PrefixTreePolicy) and memory admission, driven
through the real scheduler and KV cache manager with a stand-in runner (every step samples token 7)."""

from __future__ import annotations

import random

import pytest

from kvflow.config import SchedulerConfig
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.policies import LongestPrefixPolicy, PrefixTreePolicy
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import RunnerOutput

BS = 4


def make_scheduler(num_blocks: int = 256, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks=num_blocks, block_size=BS)
    config.setdefault("batch_policy", "prefix-tree")
    return Scheduler(SchedulerConfig(**config), kv, max_model_len=512)


def run(scheduler: Scheduler, on_step=None) -> list[list[tuple[str, int, int]]]:
    """Steps until every request is done; per step, (request, start, tokens) of each chunk."""
    steps = []
    while scheduler.num_unfinished:
        out = scheduler.schedule()
        assert out.chunks, "no progress"
        steps.append([(c.request.request_id, c.start, c.num_tokens) for c in out.chunks])
        if on_step is not None:
            on_step(scheduler, out)
        scheduler.update(out, RunnerOutput(sampled={c.request.request_id: [7] for c in out.chunks if c.samples}))
    return steps


def few_shot_batch(rng: random.Random, groups: int, members: int, prefix: int, max_tokens=lambda g: 3,
                   ) -> tuple[list[Request], dict[str, int]]:
    """Groups of prompts sharing `prefix` tokens, then 2..6 tokens of their own; shuffled."""
    requests, group_of = [], {}
    for g in range(groups):
        shared = [1000 * (g + 1) + i for i in range(prefix)]
        for m in range(members):
            rid = f"g{g}m{m}"
            own = [rng.randrange(1, 900) for _ in range(rng.randrange(2, 7))]
            requests.append(Request(rid, shared + own, SamplingParams(max_tokens=max_tokens(g))))
            group_of[rid] = g
    rng.shuffle(requests)
    return requests, group_of


def prompt_tokens_computed(steps, requests: dict[str, Request]) -> int:
    return sum(min(start + n, requests[rid].num_prompt_tokens) - min(start, requests[rid].num_prompt_tokens)
               for step in steps for rid, start, n in step)


@pytest.mark.parametrize("seed", range(3))
def test_each_groups_prefix_is_computed_once_then_released(seed: int):
    rng = random.Random(seed)
    requests, group_of = few_shot_batch(rng, groups=3, members=5, prefix=16)
    loner = Request("alone", [rng.randrange(1, 900) for _ in range(9)], SamplingParams(max_tokens=3))
    scheduler = make_scheduler(max_num_batched_tokens=24)
    for r in [*requests, loner]:
        scheduler.add_request(r)
    by_id = {r.request_id: r for r in [*requests, loner]}
    admitted: list[str] = []

    def check(s: Scheduler, out) -> None:
        for c in out.chunks:
            rid = c.request.request_id
            if rid in admitted:
                continue
            admitted.append(rid)
            if rid in group_of:  # a member after its group's first starts on the cached prefix
                first = next(a for a in admitted if group_of.get(a) == group_of[rid])
                assert first == rid or c.start == 16, (rid, c.start)

    steps = run(scheduler, check)
    own = sum(r.num_prompt_tokens - 16 for r in requests) + loner.num_prompt_tokens
    assert prompt_tokens_computed(steps, by_id) == own + 3 * 16  # each prefix once
    stats = scheduler.policy.stats
    # R_saving by hand: 15 members share 16 tokens each (240 logical), computed once per group (48).
    assert stats.groups == 3 and stats.saving_ratio == pytest.approx(1 - 48 / 240) == stats.optimal_saving_ratio
    kv = scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks  # nothing leaked, the pins are gone
    for g in range(3):  # the groups' prefixes left the cache when their last member ended (not LRU)
        probe = Request("probe", [1000 * (g + 1) + i for i in range(16)] + [1], SamplingParams(max_tokens=1))
        assert kv.cached_prefix_tokens(probe) == 0


def test_groups_stay_together_in_decode_ratio_order():
    """Groups whose requests decode more (relative to what they prefill) start first, and every member but
    the leader starts on its group's cached prefix, under a cache of 64 blocks."""
    rng = random.Random(5)
    requests, group_of = few_shot_batch(rng, groups=3, members=3, prefix=12, max_tokens=lambda g: [2, 40, 10][g])
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=64)
    for r in requests:
        scheduler.add_request(r)
    starts: list[str] = []
    run(scheduler, lambda s, out: starts.extend(c.request.request_id for c in out.chunks
                                                if c.start == 0 and c.request.request_id not in starts))
    assert [group_of[rid] for rid in starts] == [1, 2, 0]  # leaders by decode ratio: 40 tokens, 10, then 2
    # (only leaders start at position 0: every other member started on its group's cached prefix)


def test_small_batches_keep_their_order_under_auto():
    rng = random.Random(1)
    requests, _ = few_shot_batch(rng, groups=2, members=3, prefix=8)
    scheduler = make_scheduler(batch_policy="auto", prefix_tree_min_batch=7)
    for r in requests:
        scheduler.add_request(r)
    first_chunks = [c.request.request_id for c in scheduler.schedule().chunks]
    assert first_chunks == [r.request_id for r in requests][:len(first_chunks)]
    assert scheduler.policy.stats.batches == 0 and not scheduler.policy.memory_admission


def test_the_output_history_replaces_max_tokens_in_the_estimate():
    policy = PrefixTreePolicy()
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    policy.attach(kv)
    r = Request("r", list(range(1, 20)), SamplingParams(max_tokens=100))
    assert policy._decode_ratio(r, 16, 4, key=1) == pytest.approx(100 / (100 + 3 + 4))
    policy._history[1] = (2, 10)  # two earlier requests of this prefix produced 5 tokens each
    assert policy._decode_ratio(r, 16, 4, key=1) == pytest.approx(5 / (5 + 3 + 4))


def test_an_aborted_leader_hands_the_prefix_to_the_next_member():
    rng = random.Random(2)
    requests, group_of = few_shot_batch(rng, groups=1, members=4, prefix=16)
    scheduler = make_scheduler(max_num_batched_tokens=8)  # the leader needs several steps for its prompt
    for r in requests:
        scheduler.add_request(r)
    out = scheduler.schedule()
    leader = out.chunks[0].request.request_id
    assert [c.request.request_id for c in out.chunks] == [leader]  # the others wait for the prefix
    scheduler.update(out, RunnerOutput(sampled={}))
    scheduler.finish_request(leader, RequestStatus.FINISHED_ABORTED)
    run(scheduler)
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_blocks


def test_memory_admission_runs_more_than_max_num_seqs_and_keeps_the_watermark():
    rng = random.Random(3)
    requests, _ = few_shot_batch(rng, groups=4, members=6, prefix=8, max_tokens=lambda g: 12)
    peaks = {}
    for admission in ("seqs", "memory"):
        scheduler = make_scheduler(num_blocks=80, max_num_seqs=4, admission=admission, kv_watermark=0.1,
                                   max_num_batched_tokens=64)
        for r in requests:
            scheduler.add_request(Request(r.request_id, r.prompt_token_ids, r.params))
        most = 0

        def watch(s: Scheduler, out) -> None:
            nonlocal most
            most = max(most, len(s.running))
        run(scheduler, watch)
        peaks[admission] = most
        kv = scheduler.kv
        assert kv.peak_used_blocks <= kv.num_blocks and kv.num_free_blocks == kv.num_blocks
    assert peaks["seqs"] <= 4 < peaks["memory"]


def test_pinned_prefixes_give_way_when_nothing_else_can_run():
    """Every group's leader pins its prefix; the members' first chunks then fit only if the pins give
    their blocks back (a cache of 16 blocks, three groups): the batch must still finish, with no leak."""
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=64)
    for g in range(3):
        shared = [100 * (g + 1) + i for i in range(16)]
        scheduler.add_request(Request(f"g{g}a", shared + [1], SamplingParams(max_tokens=1)))
        scheduler.add_request(Request(f"g{g}b", shared + [2] * 28, SamplingParams(max_tokens=1)))
    steps = run(scheduler)
    assert len(steps) < 20 and not scheduler.waiting
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_blocks


def test_an_outer_prefix_another_group_still_needs_stays_cached():
    """Two groups under one 8-token system prompt: when the first group ends, its blocks past the system
    prompt leave the cache, the system prompt's stay for the second group's leader."""
    system = list(range(500, 508))
    policy = PrefixTreePolicy()
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    policy.attach(kv)
    from kvflow.core.policies import _common_blocks, _Group

    a = _Group(4, tuple(system + [1] * 8), 1)
    b = _Group(4, tuple(system + [2] * 8), 1)
    assert _common_blocks(a, b, BS) == 2
    leader = Request("a0", list(a.tokens) + [9], SamplingParams(max_tokens=1))
    kv.allocate(leader, leader.num_tokens)
    leader.num_computed_tokens = leader.num_tokens
    kv.cache_full_blocks(leader)
    a.pinned = kv.pin_prefix(leader, 4)
    kv.free(leader)
    policy._groups = {"a0": a, "b0": b}
    leader.status = RequestStatus.FINISHED_LENGTH
    policy.on_finish(leader)
    probe = Request("p", system + [2] * 8 + [3], SamplingParams(max_tokens=1))
    assert kv.cached_prefix_tokens(probe) == 8  # the system prompt, not a's own blocks
    assert kv.cached_prefix_tokens(Request("q", list(a.tokens) + [3], SamplingParams(max_tokens=1))) == 8


def test_an_explicit_max_num_seqs_keeps_admission_by_sequences():
    from kvflow.assets import default_model_path
    from kvflow.config import EngineConfig

    model = str(default_model_path())
    assert EngineConfig.create(model, batch_policy="prefix-tree", max_num_seqs=4).scheduler.admission == "seqs"
    assert EngineConfig.create(model, batch_policy="prefix-tree").scheduler.admission == "auto"
    assert EngineConfig.create(model, max_num_seqs=4, admission="memory").scheduler.admission == "memory"


def test_lpm_passes_over_the_oldest_request_at_most_its_limit():
    """A request nothing is cached for, ahead of a stream of prefix hits, starts after max_skips others."""
    kv = KVCacheManager(num_blocks=256, block_size=BS)
    hot = list(range(1, 13))
    computed = Request("c", hot, SamplingParams(max_tokens=1))
    kv.allocate(computed, computed.num_tokens)
    computed.num_computed_tokens = computed.num_tokens
    kv.cache_full_blocks(computed)
    policy = LongestPrefixPolicy(max_skips=3)
    policy.attach(kv)
    from collections import deque

    cold = Request("cold", [900, 901, 902, 903, 904], SamplingParams(max_tokens=1))
    waiting = deque([cold] + [Request(f"hit{i}", hot + [i + 50], SamplingParams(max_tokens=1)) for i in range(10)])
    order = []
    while waiting:
        order.append(policy.pop_next(waiting).request_id)
        waiting.append(Request(f"new{len(order)}", hot + [200 + len(order)], SamplingParams(max_tokens=1)))
        if len(order) > 20:
            break
    assert order.index("cold") == 3
