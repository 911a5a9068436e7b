"""The file tier outlives the server: a second `kvflow serve` answers a prefix the first one computed
from the tier (fewer tokens computed, the same completion), and reports it in its metrics."""

from __future__ import annotations

import random

import httpx


def _complete(url: str, prompt: list[int]) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_second_server_loads_what_the_first_computed(start_server, tmp_path):
    tier = ["--kv-offload-dir", str(tmp_path / "kv"), "--kv-offload-load", "always"]
    rng = random.Random(3)
    prompt = [rng.randrange(3, 500) for _ in range(64)]

    first = start_server(*tier)
    before = _complete(first.url, prompt)
    assert before["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first.stop() == 0  # a graceful stop writes what is still staged
    assert list((tmp_path / "kv").rglob("*.kvchunk"))

    second = start_server(*tier)
    after = _complete(second.url, prompt)
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    cached = after["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 60  # 15 of the 16 4-token blocks: the last token is always computed
    assert _metric(second.url, "kvflow:kv_offload_tier_hit_blocks_total") == 15
    assert _metric(second.url, "kvflow:prefix_cache_hits_total") == 0  # nothing came from the working pool
