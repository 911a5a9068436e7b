"""cache_salt over HTTP: a request reuses cached KV only from requests with the same salt."""

from __future__ import annotations

import httpx
import pytest

from tests.server.test_server_faults import metric

PROMPT = "salted prompt " * 12  # long enough for several full blocks of 4 tokens; used by no other test


def hits_after(url: str, **extra: object) -> float:
    """Prefix-cache hit tokens this one request added."""
    before = metric(url, "kvflow:prefix_cache_hits_total")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0, **extra},
                   timeout=60)
    assert r.status_code == 200, r.text
    return metric(url, "kvflow:prefix_cache_hits_total") - before


def test_only_requests_with_the_same_salt_share_cached_blocks(server):
    assert hits_after(server.url, cache_salt="tenant-a") == 0  # first of its salt
    assert hits_after(server.url, cache_salt="tenant-b") == 0  # same tokens, another salt
    assert hits_after(server.url) == 0  # no salt is a salt of its own
    assert hits_after(server.url, cache_salt="tenant-a") > 0
    assert hits_after(server.url, cache_salt="tenant-b") > 0
    assert hits_after(server.url) > 0


@pytest.mark.parametrize("salt", ["", 5, ["a"]])
def test_bad_salts_are_refused(server, salt):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "cache_salt": salt})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
