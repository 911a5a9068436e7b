"""Prometheus metrics, named like vLLM's (`vllm:` -> `kvflow:`) so existing dashboards adapt.

Gauges come from the scheduler stats the engine core sends with every step; latencies are
measured on the API side when outputs arrive (what a client sees, minus the network), except that
the phases which start at a request's first scheduling (queue, prefill, inference time) take that
moment from the core (same monotonic clock on one host).
One registry per server, so several servers can live in one test process.
"""

from __future__ import annotations

import dataclasses
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvflow.config import CacheConfig
from kvflow.engine.core import EngineStats
from kvflow.engine.messages import CoreStats
from kvflow.kv_transfer.offload.connector import OffloadStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# CacheConfig fields that vLLM's cache_config_info names differently (kvflow's name -> vLLM's).
_VLLM_CACHE_LABELS = {"kv_cache_dtype": "cache_dtype", "num_blocks": "num_gpu_blocks_override"}


def iteration_token_buckets(max_num_batched_tokens: int | None = None) -> tuple[float, ...]:
    """vLLM's buckets for tokens per step (eager mode: 1, 8, 16, ... powers of two) up to the first power
    of two >= the step budget; without one, up to 16384 as vLLM's list."""
    top = max_num_batched_tokens or 16384
    buckets, bound = [1.0], 8
    while bound < top:
        buckets.append(float(bound))
        bound *= 2
    buckets.append(float(bound))
    return tuple(buckets)


def cache_config_labels(cache: CacheConfig, num_blocks: int) -> dict[str, str]:
    """Labels of kvflow:cache_config_info: every CacheConfig field as a string (as vLLM's
    `metrics_info`), under vLLM's name where it has one, plus the KV blocks the engine has
    (`num_gpu_blocks`, whatever the device) and whether KV offload tiers are on (`kv_offload`; the
    file tier's folder is left out: a path is no dashboard's business)."""
    labels = {_VLLM_CACHE_LABELS.get(field.name, field.name): str(getattr(cache, field.name))
              for field in dataclasses.fields(cache) if field.name != "kv_offload_dir"}
    labels["kv_offload"] = str(cache.kv_offload)
    labels["num_gpu_blocks"] = str(num_blocks)
    return labels


class ServerMetrics:
    def __init__(self, model_name: str, max_num_batched_tokens: int | None = None) -> None:
        """`max_num_batched_tokens`: the engine's step budget, the top of the iteration-tokens buckets."""
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kvflow:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            metric = Counter(f"kvflow:{name}", doc, labels + list(extra), registry=r)
            return metric if extra else metric.labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"kvflow:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).")
        self.kv_cache_blocks = gauge("kv_cache_blocks", "KV blocks of the engine (all live instances).")
        self.prefix_cache_hit_rate = gauge("prefix_cache_hit_rate", "Prefix-cache hit rate over all queried tokens.")
        self.engine_healthy = gauge("engine_healthy", "1 while the engine-core process is alive.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that reached their first token.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._request_success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self._requests_rejected = counter("request_rejected", "Requests refused before the engine.", ("reason",))
        self.preemptions = counter("num_preemptions", "Requests preempted (KV cache full).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between successive outputs of a request.",
                             _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS)
        # vLLM v1's per-request phases, observed when a request finishes (one with no token has no prefill or decode).
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token.",
                                      _LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.", _LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "First scheduled to last token.",
                                        _LATENCY_BUCKETS)
        # vLLM v1's TPOT: one observation per output after a request's first (the same values as the
        # inter-token latency, which vLLM later renamed it to; several speculative tokens are one output).
        self.tpot = histogram("time_per_output_token_seconds", "Time between successive outputs of a request "
                              "(vLLM v1's TPOT; the same as inter_token_latency_seconds).", _LATENCY_BUCKETS)
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens each engine step computed: prompt chunks, decodes and "
            "speculative proposals verified (prefix-cache hits and loaded KV are not computed).",
            iteration_token_buckets(max_num_batched_tokens))
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length per request.", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS)
        self.kv_transfers = counter("kv_transfers", "KV transfers from prefill to decode instances (disaggregated).")
        self.kv_transfer_bytes = counter("kv_transfer_bytes", "Bytes moved by KV transfers, control messages included.")
        self.kv_transfer_seconds = histogram(
            "kv_transfer_seconds", "Per request: decode-side pull start to KV installed (overlaps the prefill).",
            _LATENCY_BUCKETS)
        self.kv_transfer_exposed_seconds = histogram(
            "kv_transfer_exposed_seconds", "Per request: prompt done (or pull arrived, if later) to the decode side "
            "acknowledging the KV; what the transfer adds to TTFT.", _LATENCY_BUCKETS)
        self.kv_transfer_request_bytes = histogram(
            "kv_transfer_request_bytes", "KV bytes per transferred request.",
            tuple(float(2**k) for k in range(10, 34, 2)))
        self.kv_load_fallbacks = counter(
            "kv_load_fallbacks", "Decode-side loads that failed, so the prompt was recomputed there.")
        self.spec_drafts = counter("spec_decode_num_drafts", "Speculative verifications (one request, one step).")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative tokens proposed and verified.")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Speculative tokens accepted.")
        self._spec_per_position = counter("spec_decode_num_accepted_tokens_per_pos",
                                          "Speculative tokens accepted, by position in the proposal.", ("position",))
        self._last_per_position: list[int] = []
        self.specontext = (
            counter("specontext_sparse_steps", "SpeContext decodes that read a selection (one request, one step)."),
            counter("specontext_moved_tokens", "SpeContext (KV head, token) pairs moved into buffers (the set "
                    "difference from the last step's selection)."),
            counter("specontext_kept_tokens", "SpeContext (KV head, token) pairs already in the buffer when selected "
                    "again (the step-to-step overlap)."),
            counter("specontext_moved_bytes", "KV bytes SpeContext moved into buffers, every layer."),
            counter("specontext_offloaded_bytes", "KV bytes --kv-resident-memory moved to the offload tier (one "
                    "layer of one block at a time)."))
        self._last_specontext = (0, 0, 0, 0, 0)
        self.kv_resident_bytes = gauge("kv_resident_bytes", "--kv-resident-memory: the memory model's count of the "
                                       "KV blocks' memory.")
        # vLLM's lora_requests_info: one series at the time of the last update, its labels the adapters.
        self._lora_info = Gauge("kvflow:lora_requests_info", "LoRA adapters of running and waiting requests "
                                "(labels; the value is the update's Unix time), and the adapter slots.",
                                ["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                                registry=r)
        self._lora_labels: tuple[str, str, str] | None = None
        self.lora_loads = (
            counter("lora_slot_loads", "LoRA adapters written into a slot (the step needed one not resident)."),
            counter("lora_disk_loads", "LoRA adapters read from disk (first use, or after leaving host memory)."))
        self._last_lora = (0, 0)
        self._label = model_name
        self.kv_offload = _OffloadMetrics(r, model_name)
        # Preemptions, prefix queries, prefix hits, KV load fallbacks, speculative counts: cumulative in the core.
        self._last_core = (0, 0, 0, 0, 0, 0, 0)
        self._cache_info: Gauge | None = None
        self._cache_key: tuple[CacheConfig, int] | None = None
        self._cache_labels: dict[str, str] = {}
        self.engine_healthy.set(1)

    def finished(self, reason: str) -> None:
        self._request_success.labels(self._label, reason).inc()

    def rejected(self, reason: str) -> None:
        self._requests_rejected.labels(self._label, reason).inc()

    def update_core(self, stats: CoreStats) -> None:
        engine = stats.engine
        self.num_requests_running.set(engine.num_running)
        self.num_requests_waiting.set(engine.num_waiting)
        self.kv_cache_usage.set(engine.kv_cache_usage)
        self.kv_cache_blocks.set(engine.num_blocks)
        self.prefix_cache_hit_rate.set(engine.prefix_cache_hit_rate)
        now = (engine.num_preemptions, stats.prefix_queried_tokens, stats.prefix_hit_tokens,
               engine.num_kv_load_failures, engine.spec_num_drafts, engine.spec_num_draft_tokens,
               engine.spec_num_accepted_tokens)
        counters = (self.preemptions, self.prefix_queries, self.prefix_hits, self.kv_load_fallbacks,
                    self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens)
        for metric, new, old in zip(counters, now, self._last_core):
            if new > old:
                metric.inc(new - old)
        self._last_core = now
        specontext = (engine.specontext_steps, engine.specontext_moved_tokens, engine.specontext_kept_tokens,
                      engine.specontext_moved_bytes, engine.specontext_offloaded_bytes)
        self.kv_resident_bytes.set(engine.kv_resident_bytes)
        for metric, new, old in zip(self.specontext, specontext, self._last_specontext):
            if new > old:
                metric.inc(new - old)
        self._last_specontext = specontext
        for position, count in enumerate(engine.spec_accepted_per_position):
            old = self._last_per_position[position] if position < len(self._last_per_position) else 0
            if count > old:
                self._spec_per_position.labels(self._label, str(position)).inc(count - old)
        self._last_per_position = list(engine.spec_accepted_per_position)
        if engine.kv_offload is not None:
            self.kv_offload.update(engine.kv_offload)
        if engine.lora_max:
            self._update_lora(engine)

    def _update_lora(self, engine: EngineStats) -> None:
        labels = (str(engine.lora_max), ",".join(engine.lora_running), ",".join(engine.lora_waiting))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self._lora_info.remove(self._label, *self._lora_labels)
            self._lora_labels = labels
        self._lora_info.labels(self._label, *labels).set(time.time())
        now = (engine.lora_slot_loads, engine.lora_disk_loads)
        for metric, new, old in zip(self.lora_loads, now, self._last_lora):
            if new > old:
                metric.inc(new - old)
        self._last_lora = now

    def steps(self, step_tokens: list[int]) -> None:
        """The token counts of engine steps (StepOutputs.step_tokens)."""
        for tokens in step_tokens:
            self.iteration_tokens.observe(tokens)

    def cache_config(self, cache: CacheConfig, num_blocks: int) -> None:
        """Set kvflow:cache_config_info (a gauge at 1 whose labels are the cache config, as vLLM's); cheap
        to call with every step: it changes the series only when the KV block count does."""
        key = (cache, num_blocks)
        if key == self._cache_key:
            return
        labels = cache_config_labels(cache, num_blocks)
        if self._cache_info is None:
            self._cache_info = Gauge("kvflow:cache_config_info", "Information of the engine's cache config.",
                                     ["model_name", *labels], registry=self.registry)
        else:
            self._cache_info.remove(self._label, *self._cache_labels.values())
        self._cache_info.labels(self._label, *labels.values()).set(1)
        self._cache_key, self._cache_labels = key, labels

    def kv_transferred(self, payload_bytes: int, wire_bytes: int, seconds: float) -> None:
        self.kv_transfers.inc()
        self.kv_transfer_bytes.inc(wire_bytes)
        self.kv_transfer_seconds.observe(seconds)
        self.kv_transfer_request_bytes.observe(payload_bytes)

    def kv_transfer_exposed(self, seconds: float) -> None:
        self.kv_transfer_exposed_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _OffloadMetrics:
    """KV offload tiers (kvflow/kv_transfer/offload/): the connector's counters and each tier's."""

    _COUNTERS = (("lookups", "Requests looked up in the offload tiers."),
                 ("queried_blocks", "Blocks past the working pool's prefix hit looked up in the offload tiers."),
                 ("found_blocks", "Looked-up blocks an offload tier held (hits)."),
                 ("missed_blocks", "Looked-up blocks no offload tier held (misses)."),
                 ("loads", "Loads from the offload tiers started."),
                 ("failed_loads", "Loads from the offload tiers that read nothing (the prompt was recomputed)."),
                 ("skipped_loads", "Tier hits left to recompute because loading would be slower."),
                 ("dropped_write_blocks", "Completed blocks not written to a tier (writer behind, or a write failed)."))
    _TIER_COUNTERS = (("hit_blocks", "Blocks loaded from the tier."),
                      ("blocks_written", "Blocks written to the tier."),
                      ("bytes_read", "Bytes read from the tier."),
                      ("bytes_written", "Bytes written to the tier."),
                      ("read_seconds", "Seconds spent reading from the tier."),
                      ("write_seconds", "Seconds spent writing to the tier."),
                      ("evicted_blocks", "Blocks evicted from the tier (LRU)."),
                      ("errors", "Failed reads, writes and checks (each logged)."))

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        labels = ["model_name"]
        self._label = model_name
        self._counters = {name: Counter(f"kvflow:kv_offload_{name}", doc, labels, registry=registry)
                          for name, doc in self._COUNTERS}
        self._tier_counters = {name: Counter(f"kvflow:kv_offload_tier_{name}", doc, labels + ["tier"],
                                             registry=registry)
                               for name, doc in self._TIER_COUNTERS}
        self._load_queue = Gauge("kvflow:kv_offload_load_queue", "Loads from the offload tiers in flight.", labels,
                                 registry=registry)
        self._write_queue = Gauge("kvflow:kv_offload_write_queue_bytes", "Staged KV bytes waiting to be written.",
                                  labels, registry=registry)
        self._stored = Gauge("kvflow:kv_offload_tier_stored_bytes", "Bytes an offload tier holds.",
                             labels + ["tier"], registry=registry)
        self._capacity = Gauge("kvflow:kv_offload_tier_capacity_bytes", "Bytes an offload tier may hold.",
                               labels + ["tier"], registry=registry)
        self._last: dict[tuple[str, str], float] = {}

    def _advance(self, counter: Counter, key: tuple[str, str], value: float, *labels: str) -> None:
        old = self._last.get(key, 0.0)
        if value > old:
            counter.labels(self._label, *labels).inc(value - old)
        self._last[key] = value

    def update(self, stats: OffloadStats) -> None:
        values = {name: getattr(stats, name, 0) for name, _ in self._COUNTERS}
        values["missed_blocks"] = stats.queried_blocks - stats.found_blocks
        for name, counter in self._counters.items():
            self._advance(counter, ("", name), values[name])
        self._load_queue.labels(self._label).set(stats.load_queue)
        self._write_queue.labels(self._label).set(stats.write_queue_bytes)
        for tier in stats.tiers:
            for name, counter in self._tier_counters.items():
                self._advance(counter, (tier.name, name), getattr(tier, name), tier.name)
            self._stored.labels(self._label, tier.name).set(tier.stored_bytes)
            self._capacity.labels(self._label, tier.name).set(tier.capacity_bytes)
