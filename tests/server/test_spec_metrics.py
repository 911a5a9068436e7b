"""A server with speculative decoding (n-gram prompt lookup) exports the speculative counters:
drafts, proposed and accepted tokens, accepted tokens per position; a request that opts out
(`"speculative": false` in the body) moves none of them; a streamed request (several tokens per
step arrive as deltas) gives the same text, with stop strings inside an accepted run."""

from __future__ import annotations

import json
import time

import httpx

from kvflow.assets import default_model_path
from tests.server.server_utils import ServerProcess

COUNTERS = ("kvflow:spec_decode_num_drafts_total", "kvflow:spec_decode_num_draft_tokens_total",
            "kvflow:spec_decode_num_accepted_tokens_total", "kvflow:spec_decode_num_accepted_tokens_per_pos_total")
# Repeats itself, so prompt lookup proposes and the shipped model's continuation accepts.
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"


def samples(url: str) -> dict[str, dict[str, float]]:
    """Each counter's samples by label string."""
    out: dict[str, dict[str, float]] = {name: {} for name in COUNTERS}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, rest = line.partition("{")
        if name in out:
            labels, _, value = rest.rpartition("} ")
            out[name][labels] = float(value)
    return out


def totals(url: str) -> dict[str, float]:
    return {name: sum(values.values()) for name, values in samples(url).items()}


def test_speculative_counters_after_a_request(tmp_path):
    proc = ServerProcess(default_model_path(), tmp_path / "serve.log", "--speculative-method", "ngram",
                         "--num-speculative-tokens", "4")
    try:
        proc.wait_ready()
        body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0.0, "ignore_eos": True}
        opted_out = httpx.post(f"{proc.url}/v1/completions", json={**body, "speculative": False}, timeout=60)
        assert opted_out.status_code == 200, opted_out.text
        time.sleep(0.5)
        assert all(v == 0 for v in totals(proc.url).values())  # opted out: nothing speculated
        r = httpx.post(f"{proc.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == opted_out.json()["choices"][0]["text"]  # greedy: the same text
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and totals(proc.url)[COUNTERS[2]] == 0:
            time.sleep(0.1)
        values = samples(proc.url)
        total = {name: sum(v.values()) for name, v in values.items()}
        assert all(v > 0 for v in total.values()), total
        drafts, proposed, accepted, per_pos = (total[name] for name in COUNTERS)
        assert drafts <= proposed <= 4 * drafts and accepted <= proposed
        assert per_pos == accepted  # each accepted token counted once, at its position
        assert 'position="0"' in next(iter(values[COUNTERS[3]]))
        text = r.json()["choices"][0]["text"]
        assert _streamed(proc.url, body) == text
        stop = text[len(text) // 2: len(text) // 2 + 3]  # inside what the run accepted
        want = text[:text.index(stop)]
        assert _streamed(proc.url, {**body, "stop": [stop]}) == want
        plain = httpx.post(f"{proc.url}/v1/completions", json={**body, "stop": [stop], "speculative": False},
                           timeout=60)
        assert plain.json()["choices"][0]["text"] == want
    finally:
        proc.stop()


def _streamed(url: str, body: dict) -> str:
    """The text of a streamed completion, its deltas joined."""
    parts = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.extend(choice["text"] for choice in json.loads(line[6:])["choices"])
    return "".join(parts)
