"""vLLM's series that dashboards use, under `kvflow:`: per-request phases (prefill, decode, inference),
time per output token, tokens per engine step, and the cache config as an info gauge. A live server's
values are checked against what its responses say (tokens generated, prompt tokens not cached); the
helpers of the metrics module alone against vLLM's conventions."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvflow.config import CacheConfig
from kvflow.server.metrics import ServerMetrics, cache_config_labels, iteration_token_buckets


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: dict, name: str) -> float:
    """A series' value summed over its label sets (one model here)."""
    return sum(value for (n, _), value in samples.items() if n == name)


def cache_info(samples: dict) -> list[dict[str, str]]:
    return [dict(labels) for (name, labels), value in samples.items()
            if name == "kvflow:cache_config_info" and value == 1]


def test_vllm_series_match_the_responses(start_server) -> None:
    srv = start_server()  # tests/server/server_utils.py ENGINE_ARGS: block size 4, 512 blocks
    deadline = time.monotonic() + 10
    while not cache_info(before := scrape(srv.url)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the core's first stats follow its READY: before any request
    [info] = cache_info(before)
    want = cache_config_labels(CacheConfig(block_size=4, num_blocks=512), 512)
    assert info == {"model_name": info["model_name"], **want}
    assert (info["block_size"], info["num_gpu_blocks"], info["cache_dtype"]) == ("4", "512", "auto")
    assert (info["enable_prefix_caching"], info["kv_offload"]) == ("True", "False")
    assert total(before, "kvflow:iteration_tokens_total_count") == 0

    prompt_a = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    prompt_b = "class Stack:\n    def __init__(self):"
    usages = []
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        # The second `prompt_a` hits the prefix cache: its cached tokens are not computed.
        for prompt, max_tokens in ((prompt_a, 5), (prompt_b, 8), (prompt_a, 6)):
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                   "ignore_eos": True})
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
    after = scrape(srv.url)
    generated = [u["completion_tokens"] for u in usages]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert generated == [5, 8, 6] and cached[2] > 0

    def delta(name: str) -> float:
        return total(after, f"kvflow:{name}") - total(before, f"kvflow:{name}")

    # Each step computes the uncached prompt, then one token per later output (the last one sampled
    # is never fed back): tokens per step sum to that over requests.
    computed = sum(u["prompt_tokens"] - c + g - 1 for u, c, g in zip(usages, cached, generated))
    assert delta("iteration_tokens_total_sum") == computed
    assert max(generated) <= delta("iteration_tokens_total_count") <= sum(generated)
    # TPOT, as vLLM v1: one interval per output after the first (one token per output without speculation).
    assert delta("time_per_output_token_seconds_count") == sum(g - 1 for g in generated)
    assert delta("time_per_output_token_seconds_sum") == pytest.approx(delta("inter_token_latency_seconds_sum"))
    for phase in ("prefill", "decode", "inference"):
        assert delta(f"request_{phase}_time_seconds_count") == 3
        assert delta(f"request_{phase}_time_seconds_sum") > 0
    prefill, decode = delta("request_prefill_time_seconds_sum"), delta("request_decode_time_seconds_sum")
    assert delta("request_inference_time_seconds_sum") == pytest.approx(prefill + decode, abs=1e-6)
    # Queue then prefill is the time to first token; inference ends at the last token, within e2e.
    queue, ttft = delta("request_queue_time_seconds_sum"), delta("time_to_first_token_seconds_sum")
    assert queue + prefill == pytest.approx(ttft, abs=1e-3)
    assert prefill + decode <= delta("e2e_request_latency_seconds_sum")
    assert cache_info(after) == [info]


def test_disaggregated_server_counts_every_instance(start_server) -> None:
    """The router's own output path: prefill instances' steps count too, and the info gauge
    reports the KV blocks of all instances."""
    srv = start_server("--disagg", "--prefill", "1", "--decode", "1")
    computed = 0
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for prompt, max_tokens in (("import os\nimport sys\n", 5), ("def main():\n    return", 7)):
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                   "ignore_eos": True})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            computed += (usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
                         + usage["completion_tokens"] - 1)
    deadline = time.monotonic() + 10  # the prefill instance's messages take their own path to the front
    while total(samples := scrape(srv.url), "kvflow:iteration_tokens_total_sum") < computed \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert total(samples, "kvflow:iteration_tokens_total_sum") == computed
    assert total(samples, "kvflow:request_prefill_time_seconds_count") == 2
    assert [i["num_gpu_blocks"] for i in cache_info(samples)] == ["1024"]  # 512 blocks on each instance


def test_iteration_token_buckets_follow_vllm() -> None:
    assert iteration_token_buckets() == (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    assert iteration_token_buckets(2048)[-2:] == (1024, 2048)
    assert iteration_token_buckets(3000)[-2:] == (2048, 4096)  # the budget falls in a bucket, not in +Inf
    assert iteration_token_buckets(4) == (1, 8)


def test_cache_config_info_and_steps() -> None:
    metrics = ServerMetrics("m", max_num_batched_tokens=256)
    cache = CacheConfig(block_size=8, kv_cache_dtype="int8", kv_offload_dir="/tmp/x")
    metrics.cache_config(cache, 100)
    metrics.cache_config(cache, 100)

    def infos() -> list[dict[str, str]]:
        return [s.labels for f in metrics.registry.collect() if f.name == "kvflow:cache_config_info"
                for s in f.samples if s.value == 1]

    [info] = infos()
    assert info["model_name"] == "m"
    assert (info["block_size"], info["cache_dtype"], info["enable_prefix_caching"]) == ("8", "int8", "True")
    assert (info["num_gpu_blocks"], info["num_gpu_blocks_override"], info["kv_offload"]) == ("100", "None", "True")
    assert "kv_offload_dir" not in info and "kv_cache_dtype" not in info
    metrics.cache_config(cache, 80)  # an instance gone (disaggregated): one series, the new count
    assert [i["num_gpu_blocks"] for i in infos()] == ["80"]

    metrics.steps([3, 1, 256])
    registry = metrics.registry
    assert registry.get_sample_value("kvflow:iteration_tokens_total_count", {"model_name": "m"}) == 3
    assert registry.get_sample_value("kvflow:iteration_tokens_total_sum", {"model_name": "m"}) == 260
    assert registry.get_sample_value("kvflow:iteration_tokens_total_bucket", {"model_name": "m", "le": "8.0"}) == 2
    assert registry.get_sample_value("kvflow:iteration_tokens_total_bucket", {"model_name": "m", "le": "256.0"}) == 3
