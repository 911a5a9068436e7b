"""The token-budget scheduler on its own, driven by a scripted runner: budgets, chunking, admission,
preemption, prefix hits, siblings, prefill-first steps, multi-token updates, and KV loads through
a connector. Every test also checks that all blocks come back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvflow.config import SchedulerConfig
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler, SchedulerOutput
from kvflow.kv_transfer.base import ConnectorEvents, KVConnector, LoadResult, SentRecord
from kvflow.kv_transfer.wire import KVTransferParams
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import RunnerOutput, ScheduledChunk, TokenLogprobs


def make_scheduler(num_blocks: int = 64, block_size: int = 4, connector: KVConnector | None = None,
                   prefix_caching: bool = True, **config: object) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    return Scheduler(SchedulerConfig(**config), kv, max_model_len=1024, connector=connector)


def request(rid: str, num_prompt: int, max_tokens: int = 4, first: int = 0, priority: int = 0,
            **params: object) -> Request:
    return Request(rid, [first + i for i in range(num_prompt)], SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=(2,), priority=priority)


def step(s: Scheduler, tokens: Callable[[ScheduledChunk], list[int]] = lambda c: [7]) -> SchedulerOutput:
    """One step with a runner that samples `tokens(chunk)` for every chunk that samples."""
    out = s.schedule()
    s.update(out, RunnerOutput(sampled={c.request.request_id: tokens(c) for c in out.chunks if c.samples}))
    return out


def shape(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


def assert_blocks_back(s: Scheduler) -> None:
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert all(block.ref_cnt == 0 for block in s.kv.pool.blocks)


def test_budget_is_shared_running_first_then_waiting_in_order():
    s = make_scheduler(max_num_batched_tokens=8)
    a, b = request("a", 10), request("b", 6, first=100)
    s.add_request(a)
    s.add_request(b)
    assert shape(step(s)) == [("a", 0, 8)]  # a prompt chunk; b waits for budget
    assert shape(step(s)) == [("a", 8, 2), ("b", 0, 6)]  # a finishes its prompt (samples); b fits whole
    assert shape(step(s)) == [("a", 10, 1), ("b", 6, 1)]  # two decodes
    assert a.output_token_ids == [7, 7] and b.output_token_ids == [7, 7]
    while s.num_unfinished:
        step(s)
    assert a.finish_reason == b.finish_reason == "length" and a.num_output_tokens == 4
    assert_blocks_back(s)


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    s = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    a, b = request("a", 6, max_tokens=2), request("b", 5, first=50)
    s.add_request(a)
    s.add_request(b)
    assert shape(step(s)) == [("a", 0, 6)]  # b (5 tokens) does not fit the 2 left
    assert shape(step(s)) == [("a", 6, 1), ("b", 0, 5)]


def test_max_num_seqs_caps_admission():
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(request(f"r{i}", 3, first=10 * i))
    assert [rid for rid, _, _ in shape(step(s))] == ["r0", "r1"]
    assert len(s.waiting) == 1


def test_preemption_takes_the_newest_and_its_output_continues():
    s = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=64)
    a, b = request("a", 8, max_tokens=8), request("b", 8, max_tokens=8, first=100)
    s.add_request(a)
    s.add_request(b)
    step(s)  # both prompts: 2 + 2 blocks (+1 free)
    out = step(s)  # a needs a 3rd block for its 9th token: takes the free one; b too: b is preempted
    assert shape(out) == [("a", 8, 1)] and out.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == [] and s.waiting[0] is b
    assert b.output_token_ids == [7] and s.num_preemptions == 1
    while s.num_unfinished:
        step(s)
    assert b.num_output_tokens == 8 and b.output_token_ids == [7] * 8  # recomputed, then continued
    assert_blocks_back(s)


def test_prefix_hit_computes_only_the_rest():
    s = make_scheduler(max_num_batched_tokens=64)
    first = request("first", 13, max_tokens=1)
    s.add_request(first)
    while s.num_unfinished:
        step(s)
    again = request("again", 13, max_tokens=1)  # same prompt: 3 full blocks cached, 1 token left
    s.add_request(again)
    assert shape(step(s)) == [("again", 12, 1)]
    assert again.num_cached_tokens == 12
    assert_blocks_back(s)


def test_siblings_wait_for_the_leader_then_share_its_prompt_blocks():
    s = make_scheduler(max_num_batched_tokens=64)
    leader = request("l", 9, max_tokens=4)
    sibling = Request("s", leader.prompt_token_ids, SamplingParams(max_tokens=2), leader=leader)
    s.add_request(leader)
    s.add_request(sibling)  # waits until its leader has computed the prompt it will share
    assert shape(step(s)) == [("l", 0, 9)]
    assert shape(step(s)) == [("l", 9, 1), ("s", 8, 1)]
    assert sibling.block_ids[:2] == leader.block_ids[:2]
    while s.num_unfinished:
        step(s)
    assert_blocks_back(s)


def test_prefill_first_steps_run_prompts_alone():
    s = make_scheduler(max_num_batched_tokens=64, mixed_batching=False)
    a = request("a", 5, max_tokens=3)
    s.add_request(a)
    step(s)
    b = request("b", 6, max_tokens=3, first=100)
    s.add_request(b)
    assert shape(step(s)) == [("b", 0, 6)]  # a's decode waits for the admissible prompt
    assert shape(step(s)) == [("a", 5, 1), ("b", 6, 1)]  # nothing waiting: decodes run
    mixed = make_scheduler(max_num_batched_tokens=64)
    a2 = request("a", 5, max_tokens=3)
    mixed.add_request(a2)
    step(mixed)
    mixed.add_request(request("b", 6, max_tokens=3, first=100))
    assert shape(step(mixed)) == [("a", 5, 1), ("b", 0, 6)]


def test_several_tokens_per_step_stop_at_the_first_stop_and_drop_the_rest():
    s = make_scheduler(max_num_batched_tokens=64)
    eos = request("eos", 4, max_tokens=10)
    stop_id = request("stop_id", 4, max_tokens=10, first=10, stop_token_ids=[9])
    length = request("length", 4, max_tokens=3, first=20)
    floor = request("floor", 4, max_tokens=10, first=30, min_tokens=3)  # EOS ignored below 3 outputs
    for r in (eos, stop_id, length, floor):
        s.add_request(r)
    script = {"eos": [5, 2, 6], "stop_id": [5, 9, 6], "length": [5, 5, 5, 5, 5], "floor": [2, 2, 2, 8]}
    out = s.schedule()
    logprobs = {rid: [TokenLogprobs(t, -0.5, [], []) for t in tokens] for rid, tokens in script.items()}
    kept = s.update(out, RunnerOutput(sampled=script, logprobs=logprobs))
    assert kept == {"eos": 2, "stop_id": 2, "length": 3, "floor": 3}
    assert eos.output_token_ids == [5, 2] and eos.finish_reason == "stop"
    assert stop_id.output_token_ids == [5, 9] and stop_id.stop_reason == 9
    assert length.output_token_ids == [5, 5, 5] and length.finish_reason == "length"
    assert floor.output_token_ids == [2, 2, 2] and floor.finish_reason == "stop"  # the 3rd EOS counts
    assert [lp.token_id for lp in eos.output_logprobs] == [5, 2]  # logprobs of the kept tokens only
    assert s.num_unfinished == 0
    assert_blocks_back(s)


def test_several_tokens_without_a_stop_are_all_kept():
    s = make_scheduler()
    r = request("r", 4, max_tokens=10)
    s.add_request(r)
    out = s.schedule()
    assert s.update(out, RunnerOutput(sampled={"r": [5, 6, 7]})) == {"r": 3}
    assert r.output_token_ids == [5, 6, 7] and r.num_computed_tokens == 4
    assert shape(step(s)) == [("r", 4, 3)]  # the tokens' KV is computed next step


def test_abort_frees_blocks_wherever_the_request_is():
    s = make_scheduler(max_num_batched_tokens=4)
    running, waiting = request("run", 8), request("wait", 8, first=100)
    s.add_request(running)
    s.add_request(waiting)
    step(s)
    assert running.block_ids and running.num_computed_tokens == 4
    s.finish_request("run", RequestStatus.FINISHED_ABORTED)
    s.finish_request("wait", RequestStatus.FINISHED_ABORTED)
    assert s.finish_request("wait", RequestStatus.FINISHED_ABORTED) is None
    assert running.finish_reason == "abort" and s.num_unfinished == 0
    assert_blocks_back(s)


class ScriptedConnector(KVConnector):
    """Loads whole prompts that carry a transfer source; keeps finished requests' blocks when asked."""

    def __init__(self, keep_finished: bool = False) -> None:
        self.keep_finished = keep_finished
        self.started: list[tuple[str, int, list[int]]] = []
        self.cancelled: list[str] = []
        self.events = ConnectorEvents()
        self.held: dict[str, list[int]] = {}

    def register_kv_caches(self, spec, caches) -> None:  # noqa: ANN001 - no caches in these tests
        pass

    def num_tokens_to_load(self, request) -> int:  # noqa: ANN001
        return request.num_prompt_tokens if request.kv_transfer is not None else 0

    def start_load(self, request, start: int = 0) -> None:  # noqa: ANN001
        self.started.append((request.request_id, start, list(request.block_ids)))

    def cancel_load(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def finish_load(self, request, result: LoadResult) -> bool:  # noqa: ANN001
        request.append_token(result.extra)
        return True

    def request_finished(self, request) -> bool:  # noqa: ANN001
        if self.keep_finished:
            self.held[request.request_id] = list(request.block_ids)
        return self.keep_finished

    def collect(self) -> ConnectorEvents:
        events, self.events = self.events, ConnectorEvents()
        return events


def test_loaded_requests_run_from_the_first_token_the_load_did_not_cover():
    connector = ScriptedConnector()
    s = make_scheduler(connector=connector, max_num_batched_tokens=64)
    r = request("r", 10, max_tokens=3)
    r.kv_transfer = KVTransferParams("t", "somewhere:1")
    s.add_request(r)
    assert s.schedule().is_empty  # blocks for 10 + 1 tokens, then the load starts
    assert r.status == RequestStatus.RECEIVING and connector.started == [("r", 0, r.block_ids)]
    assert len(r.block_ids) == 3
    connector.events.loaded.append(LoadResult("r", num_tokens=10, payload_bytes=640, extra=42))
    out = step(s)
    assert out.loaded == [r] and r.output_token_ids[0] == 42  # the first token came with the KV
    assert shape(out) == [("r", 10, 1)]
    events = s.drain_events()
    assert [(load.request_id, load.payload_bytes) for load in events.loads] == [("r", 640)]
    assert s.drain_events().loads == []  # drained
    while s.num_unfinished:
        step(s)
    assert r.output_token_ids == [42, 7, 7]
    assert_blocks_back(s)


def test_a_failed_load_computes_the_prompt_here():
    connector = ScriptedConnector()
    s = make_scheduler(connector=connector, max_num_batched_tokens=64)
    r = request("r", 10, max_tokens=2)
    r.kv_transfer = KVTransferParams("t", "somewhere:1")
    s.add_request(r)
    s.schedule()
    connector.events.loaded.append(LoadResult("r", error="source died"))
    out = step(s)
    assert shape(out) == [("r", 0, 10)] and s.num_kv_load_failures == 1 and r.kv_transfer is None
    assert s.drain_events().blocks_released
    while s.num_unfinished:
        step(s)
    assert_blocks_back(s)


def test_an_abort_while_loading_frees_blocks_only_once_the_load_stopped():
    connector = ScriptedConnector()
    s = make_scheduler(connector=connector)
    r = request("r", 10)
    r.kv_transfer = KVTransferParams("t", "somewhere:1")
    s.add_request(r)
    s.schedule()
    s.finish_request("r", RequestStatus.FINISHED_ABORTED)
    assert connector.cancelled == ["r"] and s.kv.num_free_blocks < s.kv.num_blocks  # still being written
    connector.events.loaded.append(LoadResult("r", error="cancelled"))
    s.schedule()
    assert_blocks_back(s)


def test_held_blocks_come_back_through_the_connector():
    connector = ScriptedConnector(keep_finished=True)
    s = make_scheduler(connector=connector)
    r = request("r", 9, max_tokens=1)
    s.add_request(r)
    step(s)
    assert r.finished and s.kv.num_free_blocks == s.kv.num_blocks - 3  # held by the connector
    connector.events.release.append(connector.held.pop("r"))
    connector.events.sent.append(SentRecord("r", 0.01))
    s.schedule()
    events = s.drain_events()
    assert events.blocks_released and events.sent == [SentRecord("r", 0.01)]
    assert_blocks_back(s)


@pytest.mark.parametrize("policy", ["fcfs", "priority", "lpm"])
def test_every_policy_finishes_everything_and_gives_every_block_back(policy: str):
    s = make_scheduler(num_blocks=12, max_num_batched_tokens=16, policy=policy)
    for i in range(8):
        s.add_request(request(f"r{i}", 5 + i, max_tokens=3 + i % 3, first=(i % 2) * 100, priority=-i))
    for _ in range(200):
        if not s.num_unfinished:
            break
        step(s)
    assert s.num_unfinished == 0
    assert_blocks_back(s)


def _lora_request(rid: str, adapter: str | None, max_tokens: int = 3) -> Request:
    from kvflow.lora_request import AdapterRef

    ref = None if adapter is None else AdapterRef(adapter, f"/adapters/{adapter}", "d1g3st")
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens), eos_token_ids=(2,), lora=ref)


def test_at_most_max_loras_adapters_run_and_the_rest_queue_fairly():
    """Two slots, requests for three adapters: the third adapter's request waits (never refused), base
    requests behind it go ahead, adapter requests behind it wait too, so a slot frees for it."""
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(SchedulerConfig(), kv, max_model_len=1024, max_loras=2)
    order = [("a1", "A", 3), ("b1", "B", 3), ("c1", "C", 2), ("base", None, 2), ("a2", "A", 2)]
    for rid, adapter, n in order:
        s.add_request(_lora_request(rid, adapter, n))
    first = step(s)
    assert [c.request.request_id for c in first.chunks] == ["a1", "b1", "base"]
    started = {c.request.request_id: 0 for c in first.chunks}
    steps = 1
    while s.num_unfinished:
        out = step(s)
        assert len({c.request.lora.key for c in out.chunks if c.request.lora is not None}) <= 2
        for c in out.chunks:
            started.setdefault(c.request.request_id, steps)
        steps += 1
    # a2 (adapter A, running when it arrived) did not overtake c1, which waited for a slot.
    assert started["c1"] <= started["a2"]
    assert_blocks_back(s)
