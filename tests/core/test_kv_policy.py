"""KV policies' scheduler side (kvflow/core/kv_policy.py) against naive bookkeeping: which blocks
H2O and StreamingLLM free, SnapKV's chunking and spare blocks, Quest's reads — on a bare KV cache
manager with runner outputs written by hand."""

from __future__ import annotations

import random

import pytest

from kvflow.config import CacheConfig, resolve_kv_policy
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.kv_policy import make_kv_policy
from kvflow.core.request import Request
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import RunnerOutput, ScheduledChunk

BS = 4


def _request(kv: KVCacheManager, policy: str, budget: int, prompt_len: int, **cache) -> Request:
    settings = resolve_kv_policy(CacheConfig(kv_policy=policy, kv_budget=budget, **cache))
    request = Request("r", list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=100))
    request.kv_policy = make_kv_policy(settings, BS)
    return request


def _compute(kv: KVCacheManager, request: Request, n: int, mass: list[float] | None = None) -> ScheduledChunk:
    """One step of n tokens: allocate, 'run', advance, then the policy's after-step."""
    assert kv.allocate(request, n, request.kv_policy.spare_blocks(request, n))
    chunk = ScheduledChunk(request, request.num_computed_tokens, n, request.kv_shift,
                           request.kv_policy.op(request, request.num_computed_tokens, n))
    request.num_computed_tokens += n
    result = RunnerOutput()
    if mass is not None:
        result.kv_block_mass["r"] = mass
    request.kv_policy.after_step(request, kv, chunk, result)
    if request.num_computed_tokens >= request.num_tokens:
        request.all_token_ids.append(7)
    return chunk


def test_h2o_frees_the_block_with_least_accumulated_attention():
    """Random per-step block masses: after every step the table equals a naive H2O's (accumulate
    per original block; while over budget, drop the lightest block outside sinks, window and the
    newest block)."""
    rng = random.Random(0)
    kv = KVCacheManager(64, BS, enable_prefix_caching=False)
    request = _request(kv, "h2o", 20, 30, kv_sink_tokens=4, kv_window=6)
    _compute(kv, request, 30)
    kept = list(range(8))  # original block indices held by the naive model
    acc = {o: 0.0 for o in kept}
    assert request.kv_policy.origins(request) == kept  # the prompt step evicts nothing: no attention seen yet
    for _ in range(25):
        computed = request.num_computed_tokens + 1
        nb = -(-(computed - request.kv_shift) // BS)
        mass = [rng.random() for _ in range(nb)]
        if computed % BS == 1:  # a new block
            kept.append((computed - 1) // BS)
            acc[kept[-1]] = 0.0
        for o, m in zip(kept, mass):
            acc[o] += m
        _compute(kv, request, 1, mass)
        naive_evict(kept, acc, computed, budget=20, window=6)
        assert request.kv_policy.origins(request) == kept
        assert len(request.block_ids) == len(kept)
    kv.free(request)
    assert kv.num_free_blocks == kv.num_blocks


def naive_evict(kept: list[int], acc: dict[int, float], computed: int, budget: int, window: int) -> None:
    while (len(kept) - 1) * BS + (computed - (-(-computed // BS) - 1) * BS) > budget:
        candidates = [o for o in kept[:-1] if o >= 1 and (o + 1) * BS <= computed - window]
        if not candidates:
            return
        kept.remove(min(candidates, key=lambda o: acc[o]))


def test_streaming_keeps_sinks_and_window_only():
    kv = KVCacheManager(64, BS, enable_prefix_caching=False)
    request = _request(kv, "streaming", 14, 23, kv_sink_tokens=5)  # window 9; sinks fill 2 blocks
    _compute(kv, request, 23)
    for _ in range(10):
        computed = request.num_computed_tokens
        nb = -(-computed // BS)
        want = [o for o in range(nb) if o < 2 or (o + 1) * BS > computed - 9 or o == nb - 1]
        assert request.kv_policy.origins(request) == want
        assert request.kv_shift == (nb - len(want)) * BS
        _compute(kv, request, 1)


def test_snapkv_keeps_its_window_in_the_last_chunk_and_compacts_into_spare_blocks():
    kv = KVCacheManager(64, BS)
    request = _request(kv, "snapkv", 12, 30, kv_window=6)
    policy = request.kv_policy
    assert policy.chunk_tokens(request, 26) == 24  # 4 left would split the window: stop at 24
    assert policy.chunk_tokens(request, 30) == 30
    _compute(kv, request, 24)
    assert policy.spare_blocks(request, 6) == 3
    before = list(request.block_ids)
    chunk = _compute(kv, request, 6)
    assert chunk.kv_op.name == "snapkv" and chunk.kv_op.budget == 12 and chunk.kv_op.window == 6
    assert request.block_ids == chunk.kv_op.dest_block_ids and not set(before) & set(request.block_ids)
    assert request.kv_shift == 18 and request.kv_altered and not request.kv_spare_blocks
    assert kv.num_blocks - kv.num_free_blocks == 3
    assert _compute(kv, request, 1).kv_op is None  # once per prefill
    kv.free(request)
    assert policy.compacted is False  # reset with the blocks (a preempted request starts over)


@pytest.mark.parametrize("sinks,window,read,sink_blocks,window_blocks", [(4, 0, 4, 1, 1), (0, 6, 4, 0, 3)])
def test_quest_reads_only_past_its_budget(sinks, window, read, sink_blocks, window_blocks):
    kv = KVCacheManager(64, BS)
    request = _request(kv, "quest", 16, 15, kv_sink_tokens=sinks, kv_window=window)
    assert _compute(kv, request, 15).kv_op is None  # prefill reads everything
    assert _compute(kv, request, 1).kv_op is None  # 16 tokens: within budget
    op = _compute(kv, request, 1).kv_op
    assert (op.name, op.read_blocks, op.sink_blocks, op.window_blocks) == ("quest", read, sink_blocks,
                                                                            window_blocks)
    assert request.kv_shift == 0 and len(request.block_ids) == 5  # nothing freed


def test_specontext_holds_its_buffer_and_hands_back_what_the_runner_reported():
    """Sparse once the entries before the window blocks outnumber the buffer's slots; the buffer
    blocks are taken once and held (outside the table), what the runner says they hold comes back
    with the next op, and everything is returned (and forgotten) when the request's blocks go."""
    import torch

    from kvflow.worker.step import SpeContextResult

    kv = KVCacheManager(64, BS)
    request = _request(kv, "specontext", 12, 11, kv_window=0)  # 3 blocks: 2 of buffer (8 slots), 1 of window
    policy = request.kv_policy
    assert (policy.buffer_blocks, policy.buffer_tokens, policy.window_blocks) == (2, 8, 1)
    assert _compute(kv, request, 11).kv_op is None  # prefill reads everything
    assert _compute(kv, request, 1).kv_op is None  # 12 entries: the 2 blocks before the window fit the buffer
    op = _compute(kv, request, 1).kv_op  # 13 entries: 3 blocks (12 entries) before the window
    assert op is not None and op.name == "specontext" and op.buffer_tokens is None and op.verified_tokens == 0
    assert len(request.kv_spare_blocks) == 2 and op.dest_block_ids == request.kv_spare_blocks
    assert not set(request.kv_spare_blocks) & set(request.block_ids)
    assert request.kv_altered  # a sparse decode's KV is never shared
    held = torch.arange(16).view(2, 8)
    start = request.num_computed_tokens
    chunk = ScheduledChunk(request, start, 1, 0, policy.op(request, start, 1))
    result = RunnerOutput(kv_specontext={"r": SpeContextResult(held, 16, 5, 5 * 64, 11, 0)})
    policy.after_step(request, kv, chunk, result)
    following = policy.op(request, request.num_computed_tokens + 1, 1)
    assert torch.equal(following.buffer_tokens, held) and following.verified_tokens == 16
    assert following.dest_block_ids == op.dest_block_ids  # the same buffer
    kv.free(request)
    assert kv.num_free_blocks == kv.num_blocks and policy.held is None and policy.verified == 0
