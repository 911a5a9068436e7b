"""kv_policy / kv_budget in a request body (the OpenAI client's `extra_body`): a valid override
runs, a bad one is a 400 naming the field, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

PROMPT = "a prompt longer than a small budget " * 3


def _complete(url: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra})


def test_a_request_chooses_its_own_policy(server):
    plain = _complete(server.url)
    streaming = _complete(server.url, kv_policy="streaming", kv_budget=12)
    assert plain.status_code == 200 and streaming.status_code == 200, streaming.text
    assert streaming.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("extra,param", [
    (dict(kv_policy="lru", kv_budget=16), "kv_policy must be one of"),
    (dict(kv_policy="snapkv", kv_budget=8), "kv_budget=8 is smaller than kv_sink_tokens + kv_window"),
    (dict(kv_policy="h2o"), "kv_budget (tokens kept or read per sequence) is required"),
    (dict(kv_policy="quest", kv_budget=64), "needs the engine started with --kv-policy quest"),
    (dict(kv_policy="streaming", kv_budget=0), "kv_budget"),
])
def test_bad_overrides_are_400s_and_the_server_keeps_serving(server, extra, param):
    r = _complete(server.url, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and param in r.json()["error"]["message"]
    assert _complete(server.url).status_code == 200
