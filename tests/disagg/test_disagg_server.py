"""`kvflow serve --disagg`: one OpenAI front over prefill and decode processes, end to end."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.disagg.server_helpers import (
    PROMPTS,
    complete_all,
    instances,
    kill_decode_before_first_tokens,
    metric,
    wait_until,
)
from tests.server.server_utils import group_members


@pytest.mark.parametrize("transfer", [("tcp", "layerwise"), ("shm", "whole")])
def test_disaggregated_server_matches_colocated(start, transfer):
    colocated = start()
    expected = complete_all(colocated.url)
    colocated.stop()
    transport, mode = transfer
    srv = start("--disagg", "--prefill", "1", "--decode", "2", "--kv-transport", transport,
                "--kv-transfer-mode", mode)
    assert complete_all(srv.url) == expected
    assert metric(srv.url, "kvflow:kv_transfers_total") == len(PROMPTS)
    assert metric(srv.url, "kvflow:kv_transfer_bytes_total") > 0
    assert metric(srv.url, "kvflow:kv_load_fallbacks_total") == 0
    # Exposed transfer time: reported by the prefill instance once acknowledged; a part of TTFT.
    assert wait_until(lambda: metric(srv.url, "kvflow:kv_transfer_exposed_seconds_count") == len(PROMPTS))
    exposed = metric(srv.url, "kvflow:kv_transfer_exposed_seconds_sum")
    assert 0 < exposed < metric(srv.url, "kvflow:time_to_first_token_seconds_sum")
    assert wait_until(lambda: metric(srv.url, "kvflow:kv_cache_usage_perc") == 0)  # all blocks back, everywhere
    roles = sorted(i["role"] for i in instances(srv.url).values())
    assert roles == ["decode", "decode", "prefill"]
    assert srv.stop() == 0
    # multiprocessing's resource tracker outlives the server by a moment (it unlinks the shared
    # memory once the server's end of its pipe closes); a leak is a process that stays.
    assert wait_until(lambda: not group_members(srv.proc.pid)), group_members(srv.proc.pid)


def seeded_choices(url: str) -> list[dict]:
    """n = 3 seeded random samples of one prompt, echoed with prompt and output logprobs."""
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": PROMPTS[3], "max_tokens": 8, "n": 3, "seed": 42, "temperature": 1.0, "top_p": 0.95,
        "ignore_eos": True, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    return sorted(r.json()["choices"], key=lambda c: c["index"])


def _score_prompt(url: str) -> dict:
    """echo + max_tokens 0: the prompt's logprobs and no completion (a prompt-only request)."""
    body = {"prompt": "the cat sat on the mat", "max_tokens": 0, "echo": True, "logprobs": 1, "n": 2}
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert time.monotonic() - start < 10  # no KV hand-over to wait for (it would time out)
    return r.json()


def test_n_seeded_sampling_and_prompt_logprobs_match_colocated(start):
    colocated = start()
    expected = seeded_choices(colocated.url)
    expected_scores = _score_prompt(colocated.url)
    colocated.stop()
    srv = start("--disagg", "--prefill", "1", "--decode", "1")
    scores = _score_prompt(srv.url)
    assert [c["text"] for c in scores["choices"]] == [c["text"] for c in expected_scores["choices"]]
    assert scores["usage"]["completion_tokens"] == 0
    for g, e in zip(scores["choices"], expected_scores["choices"]):
        assert g["logprobs"]["tokens"] == e["logprobs"]["tokens"] and g["finish_reason"] == "length"
        assert g["logprobs"]["token_logprobs"][1:] == pytest.approx(e["logprobs"]["token_logprobs"][1:], abs=1e-5)
    got = seeded_choices(srv.url)
    assert len(got) == len(expected) == 3 and len({c["text"] for c in got}) == 3  # a seed each
    for g, e in zip(got, expected):
        assert (g["text"], g["logprobs"]["tokens"]) == (e["text"], e["logprobs"]["tokens"])
        assert g["logprobs"]["token_logprobs"] == pytest.approx(e["logprobs"]["token_logprobs"], abs=1e-5)
        for g_top, e_top in zip(g["logprobs"]["top_logprobs"], e["logprobs"]["top_logprobs"], strict=True):
            assert (g_top is None) == (e_top is None)
            assert g_top is None or g_top == pytest.approx(e_top, abs=1e-5)
    assert metric(srv.url, "kvflow:kv_load_fallbacks_total") == 0
    assert wait_until(lambda: metric(srv.url, "kvflow:kv_cache_usage_perc") == 0)


def test_dead_prefill_instance_is_routed_around(start):
    srv = start("--disagg", "--prefill", "2", "--decode", "1")
    expected = complete_all(srv.url)
    victim = instances(srv.url)["prefill-0"]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: not instances(srv.url)["prefill-0"]["alive"])
    assert "SIGKILL" in instances(srv.url)["prefill-0"]["error"]
    assert httpx.get(f"{srv.url}/health").status_code == 200  # still serving
    assert complete_all(srv.url) == expected
    # The last prefill instance gone too: decode instances compute the prompts themselves.
    os.kill(instances(srv.url)["prefill-1"]["pid"], signal.SIGKILL)
    assert wait_until(lambda: not instances(srv.url)["prefill-1"]["alive"])
    assert complete_all(srv.url) == expected


def test_dead_decode_instance_requests_are_retried_or_fail_clearly(start):
    srv = start("--disagg", "--prefill", "1", "--decode", "2")
    kill_decode_before_first_tokens(srv.url, complete_all(srv.url))
    state = instances(srv.url)
    assert not state["decode-0"]["alive"] and state["decode-1"]["alive"]
    assert httpx.get(f"{srv.url}/health").status_code == 200
    # Mid-stream deaths fail clearly, never hang; with no decode instance left, 503.
    os.kill(state["decode-1"]["pid"], signal.SIGKILL)
    assert wait_until(lambda: httpx.get(f"{srv.url}/health").status_code == 503)
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert wait_until(lambda: metric(srv.url, "kvflow:kv_cache_usage_perc") == 0), instances(srv.url)  # live ones
