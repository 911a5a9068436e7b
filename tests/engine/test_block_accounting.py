"""Property: whatever arrives, finishes or is aborted, every KV block comes back."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.config import EngineConfig
from kvflow.engine.llm_engine import LLMEngine
from kvflow.sampling_params import SamplingParams

add = st.tuples(
    st.just("add"),
    st.integers(1, 40),  # prompt length
    st.integers(0, 12),  # max_tokens (0: prompt logprobs only, nothing sampled)
    st.integers(1, 3),  # n
    st.booleans(),  # shares a prefix with earlier prompts
    st.sampled_from([None, "streaming", "h2o", "snapkv"]),  # the request's own KV policy
    st.sampled_from([None, 8, 13, 20]),  # and budget
)
actions = st.lists(
    st.one_of(add, st.tuples(st.just("step"), st.integers(1, 4)), st.tuples(st.just("abort"), st.integers(0, 50))),
    min_size=1,
    max_size=25,
)


def assert_all_blocks_free(engine: LLMEngine) -> None:
    kv = engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert all(block.ref_cnt == 0 for block in kv.pool.blocks)
    assert not engine.core.scheduler.running and not engine.core.scheduler.waiting


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=actions, num_blocks=st.integers(12, 40), budget=st.sampled_from([5, 16, 64]),
       engine_policy=st.sampled_from(["none", "quest", "h2o"]))
def test_every_block_comes_back(llama_dir, script, num_blocks, budget, engine_policy):
    """Also under KV policies, the engine's and requests' own: evicted, compacted and spare blocks
    are all accounted for."""
    config = EngineConfig.create(
        str(llama_dir), dtype="float32", block_size=4, num_blocks=num_blocks, max_num_batched_tokens=budget,
        max_num_seqs=6, kv_policy=engine_policy, kv_budget=12, kv_window=4,
    )
    engine = LLMEngine(config)
    shared = list(range(10, 30))
    added: list[str] = []
    for i, action in enumerate(script):
        if action[0] == "add":
            _, length, max_tokens, n, share, kv_policy, kv_budget = action
            prompt = (shared[:length] if share else [(7 * i + j) % 400 + 3 for j in range(length)])
            params = SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, n=n, ignore_eos=True,
                                    kv_policy=kv_policy, kv_budget=kv_budget,
                                    prompt_logprobs=0 if max_tokens == 0 else None)
            engine.add_request(f"r{i}", prompt, params)
            added.append(f"r{i}")
        elif action[0] == "step":
            for _ in range(action[1]):
                engine.step()
        elif added:
            engine.abort_request(added[action[1] % len(added)])
        # Invariant at every point: blocks held == blocks referenced by live requests.
        kv = engine.core.kv
        live = engine.core.scheduler.requests.values()
        assert not any(r.kv_spare_blocks for r in live), "spare blocks outlived their step"
        held = sum(len(r.block_ids) for r in live)
        distinct = len({b for r in live for b in r.block_ids})
        assert kv.num_blocks - kv.num_free_blocks == distinct <= held
        for r in live:  # a table holds exactly the KV its cache indices need
            assert len(r.block_ids) * 4 >= r.num_computed_tokens - r.kv_shift
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert not engine.has_unfinished_requests(), "requests hung"
    assert_all_blocks_free(engine)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=actions, num_blocks=st.integers(6, 16), budget=st.sampled_from([16, 64]),
       engine_policy=st.sampled_from(["none", "streaming", "snapkv"]))
def test_kivi_blocks_and_ring_slots_come_back(llama64_dir, script, num_blocks, budget, engine_policy):
    """KIVI: ring slots are held exactly by the requests holding blocks, and every block and slot
    comes back (aborts, preemption when the blocks run out, prefix hits that stop short, streaming's
    evictions, SnapKV's compaction)."""
    config = EngineConfig.create(
        str(llama64_dir), dtype="float32", block_size=32, num_blocks=num_blocks, max_num_batched_tokens=budget,
        max_num_seqs=3, kv_cache_dtype="kivi2", kv_residual_tokens=32, kv_policy=engine_policy, kv_budget=72,
        kv_window=None if engine_policy == "streaming" else 16,
    )
    engine = LLMEngine(config)
    shared = list(range(10, 110))
    added: list[str] = []
    for i, action in enumerate(script):
        if action[0] == "add":
            _, length, max_tokens, n, share, _, _ = action
            length *= 3
            prompt = (shared[:length] if share else [(7 * i + j) % 400 + 3 for j in range(length)])
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens * 4,
                                                              n=n, ignore_eos=True,
                                                              prompt_logprobs=0 if max_tokens == 0 else None))
            added.append(f"r{i}")
        elif action[0] == "step":
            for _ in range(action[1]):
                engine.step()
        elif added:
            engine.abort_request(added[action[1] % len(added)])
        kv = engine.core.kv
        live = list(engine.core.scheduler.requests.values())
        slots = [r.kv_residual_slot for r in live if r.kv_residual_slot is not None]
        assert len(slots) == len(set(slots)) == 3 - kv.num_free_residual_slots
        assert all(r.kv_residual_slot is not None for r in engine.core.scheduler.running)
        assert all(r.kv_residual_slot is None for r in live if not r.block_ids)
        assert kv.num_blocks - kv.num_free_blocks == len({b for r in live for b in r.block_ids})
        assert all(len(r.block_ids) * 32 >= r.num_computed_tokens - r.kv_shift for r in live)
    for _ in range(3000):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert not engine.has_unfinished_requests(), "requests hung"
    assert_all_blocks_free(engine)
    assert engine.core.kv.num_free_residual_slots == 3
