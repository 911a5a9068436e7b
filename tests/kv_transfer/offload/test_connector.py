"""The offload connector in a real engine: outputs equal to computing everything, every block back,
faults turned into recomputation, loads the performance model rejects left to compute."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from kvflow import LLM, SamplingParams
from kvflow.kv_transfer.offload.chunk_file import SUFFIX
from kvflow.kv_transfer.offload.file_tier import FileTier

ENGINE = dict(dtype="float32", block_size=4, max_model_len=128)
# The test model computes a prompt faster than a tier loads it: load every hit regardless.
ALWAYS = dict(kv_offload_load="always")
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _conversations(num: int = 6, length: int = 40, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length)] for _ in range(num)]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _two_turns(llm: LLM, first: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Turn 1, then turn 2 = turn 1's prompt + its answer + a few new tokens, one conversation at a time."""
    out1 = _generate(llm, first)
    second = [p + o + [7, 8, 9] for p, o in zip(first, out1)]
    out2 = [_generate(llm, [p])[0] for p in second]
    return out1 + out2, first + second


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> LLM:
    return LLM(model=str(llama_dir), num_blocks=256, enable_prefix_caching=False, **ENGINE)


def _wait_written(llm: LLM, timeout: float = 10.0) -> None:
    connector = llm.engine.core.connector
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connector.collect()  # hands staged blocks to the writer
        if connector.stats_snapshot().write_queue_bytes == 0:
            return
        time.sleep(0.01)
    raise TimeoutError("the writer did not catch up")


def _assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and not llm.engine.core.scheduler.receiving


@pytest.mark.parametrize("tiers", [
    dict(kv_offload_io="direct"),
    dict(kv_offload_io="buffered"),
    dict(kv_offload_host_size=0.01, kv_offload_dir=None),
    dict(kv_offload_host_size=0.01),
    dict(kv_cache_dtype="int8"),
])
def test_outputs_equal_computing_everything_when_hits_come_from_the_tiers(llama_dir, reference, tmp_path, tiers):
    settings = {"kv_offload_dir": str(tmp_path), **tiers}
    engine = {**ENGINE, "kv_cache_dtype": settings.pop("kv_cache_dtype", "auto")}
    llm = LLM(model=str(llama_dir), num_blocks=24, **engine, **settings, **ALWAYS)  # the pool holds ~2 conversations
    ref = reference if engine["kv_cache_dtype"] == "auto" else LLM(
        model=str(llama_dir), num_blocks=256, enable_prefix_caching=False, **engine)
    first = _conversations()
    want, prompts = _two_turns(ref, first)
    out1 = _generate(llm, first)
    _wait_written(llm)
    second = prompts[len(first):]
    out2 = []
    for prompt in second:
        out2.append(_generate(llm, [prompt])[0])
        _wait_written(llm)
    assert out1 + out2 == want
    stats = llm.engine.stats().kv_offload
    assert stats is not None and stats.failed_loads == 0
    assert stats.loads >= len(first) - 2 and stats.loaded_blocks >= (len(first) - 2) * (40 // 4)
    assert sum(t.hit_blocks for t in stats.tiers) == stats.loaded_blocks
    _assert_no_leak(llm)


def test_loaded_tokens_are_reported_as_cached(llama_dir, tmp_path):
    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS)
    prompt = _conversations(1)[0]
    llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    _wait_written(llm)
    _generate(llm, _conversations(5, seed=1))  # push it out of the working pool
    (again,) = llm.generate([{"prompt_token_ids": prompt + [5, 6]}], GREEDY, use_tqdm=False)
    assert again.num_cached_tokens == 40  # ten 4-token blocks loaded
    assert llm.engine.stats().prefix_cache_hit_rate < 1.0


def test_damaged_tier_files_are_recomputed_not_served(llama_dir, reference, tmp_path):
    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS)
    first = _conversations()
    want, prompts = _two_turns(reference, first)
    out1 = _generate(llm, first)
    _wait_written(llm)
    for path in tmp_path.rglob(f"*{SUFFIX}"):  # flip a byte in every block's KV
        data = bytearray(path.read_bytes())
        for offset in range(4096, len(data), 4096):  # the header is one page here, each record one
            data[offset + 5] ^= 0x40
        path.write_bytes(bytes(data))
    out2 = [_generate(llm, [p])[0] for p in prompts[len(first):]]
    assert out1 + out2 == want
    stats = llm.engine.stats().kv_offload
    assert stats.failed_loads >= 1 and sum(t.errors for t in stats.tiers) >= 1
    _assert_no_leak(llm)


def test_a_load_slower_than_recompute_is_not_done(llama_dir, reference, tmp_path):
    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE)
    first = _conversations()
    want, prompts = _two_turns(reference, first)
    out1 = _generate(llm, first)
    _wait_written(llm)
    cost = llm.engine.core.connector.cost
    assert cost.seconds_per_token is not None  # measured on turn 1's prompts
    cost.tiers["file"].bytes_per_s = 1.0  # a tier at a byte per second
    cost.observe_load = lambda *args: None
    out2 = [_generate(llm, [p])[0] for p in prompts[len(first):]]
    assert out1 + out2 == want
    stats = llm.engine.stats().kv_offload
    assert stats.loads == 0 and stats.skipped_loads >= len(first) - 2
    _assert_no_leak(llm)


def test_abort_during_a_load_frees_its_blocks(llama_dir, tmp_path, monkeypatch):
    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS)
    prompt = _conversations(1)[0]
    _generate(llm, [prompt])
    _wait_written(llm)
    _generate(llm, _conversations(5, seed=1))
    release = threading.Event()
    real_read = FileTier.read

    def slow_read(self, expected, out):
        release.wait(10)
        return real_read(self, expected, out)

    monkeypatch.setattr(FileTier, "read", slow_read)
    engine = llm.engine
    engine.add_request("r", {"prompt_token_ids": prompt + [1, 2]}, GREEDY)
    engine.step()
    assert "r" in {r.split("-")[0] for r in engine.core.scheduler.receiving} or engine.core.scheduler.receiving
    engine.abort_request("r")
    release.set()
    deadline = time.monotonic() + 10
    while engine.core.scheduler.cancelling and time.monotonic() < deadline:
        engine.step()
    _assert_no_leak(llm)


def test_offload_settings_are_checked():
    from kvflow.config import CacheConfig

    with pytest.raises(ValueError, match="prefix"):
        CacheConfig(kv_offload_dir="/tmp/x", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kivi"):
        CacheConfig(kv_offload_dir="/tmp/x", kv_cache_dtype="kivi4")
    with pytest.raises(ValueError, match="kv_offload_io"):
        CacheConfig(kv_offload_dir="/tmp/x", kv_offload_io="mmap")
    with pytest.raises(ValueError, match="kv_offload_size"):
        CacheConfig(kv_offload_dir="/tmp/x", kv_offload_size=0)


def test_a_full_disk_drops_writes_and_answers_requests(llama_dir, reference, tmp_path, monkeypatch, caplog):
    import errno

    from kvflow.kv_transfer.offload import file_tier as file_tier_module

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_tier_module.os, "write", full)
    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS)
    first = _conversations()
    want, prompts = _two_turns(reference, first)
    out1 = _generate(llm, first)
    _wait_written(llm)
    out2 = [_generate(llm, [p])[0] for p in prompts[len(first):]]
    assert out1 + out2 == want
    stats = llm.engine.stats().kv_offload
    assert stats.dropped_write_blocks > 0 and stats.loads == 0 and stats.tiers[0].stored_bytes == 0
    assert "No space left" in caplog.text
    assert not list(tmp_path.rglob("*.tmp"))
    _assert_no_leak(llm)


def test_an_unusable_folder_serves_without_the_file_tier(llama_dir, reference, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(blocker / "kv"), **ENGINE)
    assert "cannot use" in caplog.text
    first = _conversations(2)
    assert _generate(llm, first) == _generate(reference, first)
    assert llm.engine.stats().kv_offload.tiers == []
    _assert_no_leak(llm)


def test_a_failed_step_writes_nothing_to_the_tier(llama_dir, reference, tmp_path):
    """A forward that fails has written garbage KV into the blocks it was computing: none of it may reach
    the tier, even when the connector is closed (and flushed) right after."""
    prompt = _conversations(1)[0]
    llm = LLM(model=str(llama_dir), num_blocks=64, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS)
    runner = llm.engine.core.runner
    real = runner.cpu_forward, runner.model

    def garbage_then_fail(*args, **kwargs):
        for layer in runner.kv_caches:
            layer.normal_()  # what a half-finished forward leaves behind
        raise RuntimeError("simulated failure inside the forward pass")

    runner.cpu_forward, runner.model = None, garbage_then_fail
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    runner.cpu_forward, runner.model = real
    llm.close()
    assert not list(tmp_path.rglob(f"*{SUFFIX}"))
    with LLM(model=str(llama_dir), num_blocks=64, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS) as again:
        assert _generate(again, [prompt]) == _generate(reference, [prompt])
        assert again.engine.stats().kv_offload.loaded_blocks == 0


def test_a_loader_that_fails_unexpectedly_still_ends_the_load(llama_dir, reference, tmp_path, monkeypatch):
    from kvflow.kv_transfer.offload import io_threads

    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS)
    first = _conversations()
    want, prompts = _two_turns(reference, first)
    out1 = _generate(llm, first)
    _wait_written(llm)

    def broken(*args, **kwargs):
        raise RuntimeError("pinned memory exhausted")

    monkeypatch.setattr(io_threads, "staging", broken)
    out2 = [_generate(llm, [p])[0] for p in prompts[len(first):]]
    assert out1 + out2 == want
    stats = llm.engine.stats().kv_offload
    assert stats.failed_loads >= len(first) - 2 and stats.load_queue == 0
    assert all(thread.is_alive() for thread in llm.engine.core.connector.io._threads)
    _assert_no_leak(llm)
    llm.close()


def test_per_request_state_is_gone_after_aborted_loads(llama_dir, tmp_path, monkeypatch):
    llm = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE, **ALWAYS)
    prompts = _conversations(3)
    _generate(llm, prompts)
    _wait_written(llm)
    _generate(llm, _conversations(5, seed=1))
    release = threading.Event()
    real_read = FileTier.read

    def slow_read(self, expected, out):
        release.wait(10)
        return real_read(self, expected, out)

    monkeypatch.setattr(FileTier, "read", slow_read)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt + [1]}, GREEDY)
    engine.step()
    assert engine.core.scheduler.receiving
    for i in range(len(prompts)):
        engine.abort_request(f"r{i}")
    release.set()
    deadline = time.monotonic() + 10
    while engine.core.scheduler.cancelling and time.monotonic() < deadline:
        engine.step()
    connector = engine.core.connector
    assert not connector._no_load and not connector._looked_up and not connector._planned and not connector._loads
    _assert_no_leak(llm)
    llm.close()


def test_two_engines_cannot_share_a_tier_folder(llama_dir, tmp_path, caplog):
    with LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE) as first:
        second = LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE)
        assert "another process is using this tier" in caplog.text
        assert second.engine.stats().kv_offload.tiers == [] and first.engine.stats().kv_offload.tiers
        second.close()
    with LLM(model=str(llama_dir), num_blocks=24, kv_offload_dir=str(tmp_path), **ENGINE) as third:
        assert third.engine.stats().kv_offload.tiers  # the first one's close released the folder


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu runs it)")
@pytest.mark.parametrize("tiers", [dict(kv_offload_io="direct"), dict(kv_offload_host_size=0.01)])
def test_on_gpu_loads_equal_computing_everything(llama_dir, tmp_path, tiers):
    """The GPU path: staging through pinned memory, copies timed by CUDA events, loads scattered on the
    device; outputs equal the same GPU engine computing everything."""
    cuda = dict(ENGINE, device="cuda", num_blocks=24)
    reference = LLM(model=str(llama_dir), **{**cuda, "num_blocks": 256}, enable_prefix_caching=False)
    first = _conversations()
    want, prompts = _two_turns(reference, first)
    with LLM(model=str(llama_dir), **cuda, kv_offload_dir=str(tmp_path), **tiers, **ALWAYS) as llm:
        out1 = _generate(llm, first)
        _wait_written(llm)
        out2 = []
        for prompt in prompts[len(first):]:
            out2.append(_generate(llm, [prompt])[0])
            _wait_written(llm)
        assert out1 + out2 == want
        stats = llm.engine.stats().kv_offload
        assert stats.loaded_blocks >= (len(first) - 2) * 10 and stats.failed_loads == 0
        assert llm.engine.core.connector.cost.seconds_per_token is not None  # CUDA events were read
        _assert_no_leak(llm)
