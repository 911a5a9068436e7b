"""`kvflow bench soak` against a live server with small limits: no 5xx, an error body on every
refusal, no leaked KV blocks, bounded memory (the suite runs a short soak; `-m slow` the full one)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvflow.bench.soak import MemorySampler, SoakConfig, format_report, malformed_bodies, passed, run_soak
from tests.server.server_utils import ServerProcess

SMALL_LIMITS = ("--max-num-seqs", "4", "--max-waiting-requests", "16", "--num-blocks", "160")


def _soak(model_dir: Path, tmp_path: Path, num_requests: int, concurrency: int) -> dict:
    proc = ServerProcess(model_dir, tmp_path / "serve.log", *SMALL_LIMITS)
    try:
        proc.wait_ready()
        result = run_soak(SoakConfig(proc.url, num_requests=num_requests, concurrency=concurrency, seed=3,
                                     pids=[proc.proc.pid]))
        print(format_report(result))
        assert proc.proc.poll() is None, proc.log()
    finally:
        proc.stop(timeout=10)
    return result


def test_a_short_soak_leaves_the_server_clean(llama_dir, tmp_path):
    result = _soak(llama_dir, tmp_path, num_requests=160, concurrency=8)
    assert result["requests"] == 160
    assert not result["server_errors"], result["server_errors"]
    assert result["refusals_without_error_body"] == 0 and result["client_errors"] == 0
    assert result["idle_after"] and result["kv_cache_usage_after"] == 0.0
    by_kind = result["by_kind"]
    assert not result["unexpected_refusals"], result["unexpected_refusals"]
    assert by_kind["malformed"].get("400", 0) > 0
    assert by_kind["abandon_stream"].get("0", 0) > 0  # streams were abandoned mid-way
    assert len(result["memory"]) >= 2  # the server and its engine-core process were sampled
    assert passed(result)


@pytest.mark.slow
def test_a_thousand_request_soak(llama_dir, tmp_path):
    result = _soak(llama_dir, tmp_path, num_requests=1000, concurrency=16)
    assert passed(result), format_report(result)


def test_the_malformed_bodies_cover_the_parsers():
    names = {name for name, _, _ in malformed_bodies("m")}
    assert {"not json", "bad utf-8", "deeply nested", "n 10^9", "chat bad role"} <= names


def test_memory_sampler_follows_children():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                               "time.sleep(30)"])
    try:
        sampler = MemorySampler([parent.pid])
        for _ in range(50):
            sampler.sample()
            if len(sampler.samples[-1][1]) >= 2:
                break
            time.sleep(0.1)
        summary = sampler.summary()
        assert str(parent.pid) in summary and len(summary) >= 2
        assert all(m["peak_mib"] > 1 for m in summary.values())
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()


def test_error_events_are_told_from_tokens_named_error():
    """A streamed chunk whose logprobs hold a token "error" is not an error event (it was once counted)."""
    from kvflow.bench.soak import _event_error_code

    chunk = b'data: {"choices": [{"text": "x", "logprobs": {"top_logprobs": [{"error": -1.5}]}}]}'
    assert _event_error_code(chunk) is None
    assert _event_error_code(b"data: [DONE]") is None
    assert _event_error_code(b'data: {"error": {"message": "m", "code": "engine_dead"}}') == "engine_dead"
    assert _event_error_code(b"data: {not json") == "unparsable_event"
