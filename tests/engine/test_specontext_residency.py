"""SpeContext's adaptive memory end to end (`--kv-resident-memory`, kvflow/core/kv_residency.py and
kvflow/worker/kv_residency.py), on the shipped tiny model and its shipped retrieval head: under a cap
that forces the upper layers' older KV into the offload tier, every token is the one the same engine
generates with everything in memory (the moves that read the tier bring back exactly what left); the
model's count of memory stays under the cap at every step and equals the kernel's (tiny's fp32 blocks
are whole pages); blocks shared with another sequence stay whole; a released block is never served from
the prefix cache; nothing leaks."""

from __future__ import annotations

import random
import sys

import pytest

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path
from kvflow.core.kv_residency import KVResidency

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/mincore: Linux")

CAP = 0.004  # GiB: ~4.3 MB, against ~7 MB for two 900-token sequences in every layer
GREEDY = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)


def _prompts(count: int = 2, length: int = 600) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(length)]} for _ in range(count)]


def _llm(**kwargs) -> LLM:
    args = dict(model=str(default_model_path()), dtype="float32", kv_policy="specontext", kv_budget=256,
                kv_cache_memory=0.25)
    return LLM(**{**args, **kwargs})


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture
def peaks(monkeypatch) -> list[int]:
    """The model's count of memory after the plan of every step with SpeContext decodes."""
    seen: list[int] = []
    plan = KVResidency.plan

    def recorded(self, chunks):
        plan(self, chunks)
        if any(c.kv_op is not None and c.kv_op.name == "specontext" for c in chunks):
            seen.append(self.resident_bytes)  # (a step computing prompts needs every layer of them)

    monkeypatch.setattr(KVResidency, "plan", recorded)
    return seen


# int8: ~1/4 of the bytes, in blocks of 64 tokens (at 16 a layer's codes are 2 KiB: no whole page to give back)
@pytest.mark.parametrize("kv_cache_dtype,block_size,cap", [("auto", 16, CAP), ("int8", 64, CAP / 4)])
def test_a_cap_moves_older_kv_to_the_tier_and_changes_no_token(tmp_path, peaks, kv_cache_dtype, block_size, cap):
    args = dict(kv_cache_dtype=kv_cache_dtype, block_size=block_size)
    want = _tokens(_llm(**args).generate(_prompts(), GREEDY, use_tqdm=False))
    llm = _llm(**args, kv_resident_memory=cap, kv_spill_dir=str(tmp_path))
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == want
    core = llm.engine.core
    residency, tier = core.residency, core.runner.loader.tier
    assert max(peaks) <= residency.cap_bytes and residency.over_cap_steps == 0
    assert residency.offloaded_bytes > 0 and tier.read_tokens > 0  # layers left, and moves read them back
    stats = core.stats()
    assert (stats.kv_resident_bytes, stats.specontext_offloaded_bytes) == (residency.resident_bytes,
                                                                           residency.offloaded_bytes)
    measured = core.runner.kv_residency.resident_bytes()
    if kv_cache_dtype == "auto":  # fp32 blocks are whole pages: the kernel gives back what the model counts
        assert tier.released_bytes == residency.offloaded_bytes
        assert measured == residency.resident_bytes
    else:  # the per-token scales' chunks are not: the model counts them as never given back
        assert measured <= residency.resident_bytes
    assert list(tmp_path.iterdir()) == []  # the tier's files are unlinked once mapped
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_shared_blocks_stay_whole():
    """n = 2 siblings share their prompt's blocks: they stay whole (each sibling reads every layer of them;
    released, a sibling would read zeros), the siblings' own older blocks go; run again, the prompt's blocks
    are a prefix hit, whole."""
    prompt = _prompts(1)
    pair = SamplingParams(n=2, temperature=0.0, max_tokens=300, ignore_eos=True)
    want = [c.token_ids for c in _llm().generate(prompt, pair, use_tqdm=False)[0].outputs]
    llm = _llm(kv_resident_memory=CAP)
    for _ in range(2):
        out = llm.generate(prompt, pair, use_tqdm=False)[0]
        assert [c.token_ids for c in out.outputs] == want
    assert out.num_cached_tokens >= 600 - 16  # (the second time)
    assert llm.engine.core.residency.offloaded_bytes > 0
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_a_released_block_is_never_a_prefix_hit():
    """A prompt's blocks enter the prefix cache when computed; once their upper layers are released they
    leave it, so the same prompt again computes them instead of reading zeros."""
    prompt = _prompts(1)
    want = _tokens(_llm().generate(prompt, GREEDY, use_tqdm=False))
    llm = _llm(kv_resident_memory=CAP / 2)  # one 900-token sequence needs ~3.7 MB in every layer
    first = llm.generate(prompt, GREEDY, use_tqdm=False)
    second = llm.generate(prompt, GREEDY, use_tqdm=False)
    assert _tokens(first) == _tokens(second) == want
    assert llm.engine.core.residency.offloaded_bytes > 0
    assert second[0].num_cached_tokens < 600 // 2  # the released blocks were not found


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="needs --kv-policy specontext"):
        LLM(model=str(default_model_path()), kv_resident_memory=0.1)
    with pytest.raises(ValueError, match="give --kv-resident-memory too"):
        _llm(kv_spill_dir="/tmp")
    with pytest.raises(ValueError, match="must be > 0 GiB"):
        _llm(kv_resident_memory=0)
    with pytest.raises(ValueError, match="less than a memory page, so releasing it gives nothing back"):
        _llm(kv_resident_memory=0.01, kv_cache_dtype="int8")  # 2 KiB of codes per layer-block


@pytest.mark.slow
def test_a_long_generation_stays_under_the_cap(peaks):
    """One sequence to tiny's full context (2,048 tokens): memory stays under a cap of a third of what it
    needs in every layer, and every token is the uncapped engine's."""
    long = SamplingParams(temperature=0.0, max_tokens=1900, ignore_eos=True)
    prompt = _prompts(1, 148)
    want = _tokens(_llm().generate(prompt, long, use_tqdm=False))
    llm = _llm(kv_resident_memory=0.0025)
    assert _tokens(llm.generate(prompt, long, use_tqdm=False)) == want
    core = llm.engine.core
    assert max(peaks) <= core.residency.cap_bytes
    assert core.runner.kv_residency.resident_bytes() == core.residency.resident_bytes
    assert core.kv.num_free_blocks == core.kv.num_blocks
