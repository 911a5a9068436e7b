"""What the server says about a run: its Prometheus counters, scraped before and after.

The client sees latencies; only the server knows how much of a TTFT was KV transfer in a
disaggregated deployment. Scraping `/metrics` around the timed run and differencing the
cumulative series gives per-run figures without restarting the server (earlier runs and the
probe request fall out of the difference). Servers without kvflow's series (vLLM, llama.cpp)
simply give no `server` section.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "kvflow:"


async def scrape(session: aiohttp.ClientSession, base_url: str) -> dict[str, float] | None:
    """kvflow's sample values by sample name (label sets summed); None if there are none."""
    try:
        async with session.get(f"{base_url.rstrip('/')}/metrics") as response:
            if response.status != 200:
                return None
            text = await response.text()
    except aiohttp.ClientError:
        return None
    return parse(text) or None


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> kvflow's sample values by name, label sets summed (histogram buckets left out)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX) and "le" not in sample.labels:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def run_figures(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """Per-run server figures from two scrapes: counts, bytes and the KV transfer share of TTFT."""
    if before is None or after is None:
        return None

    def delta(name: str) -> float:
        return after.get(PREFIX + name, 0.0) - before.get(PREFIX + name, 0.0)

    figures: dict[str, Any] = {
        "requests_with_first_token": delta("time_to_first_token_seconds_count"),
        "ttft_seconds_sum": delta("time_to_first_token_seconds_sum"),
        "preemptions": delta("num_preemptions_total"),
    }
    transfers = delta("kv_transfers_total")
    if transfers > 0:
        exposed_count = delta("kv_transfer_exposed_seconds_count")
        exposed_sum = delta("kv_transfer_exposed_seconds_sum")
        figures.update({
            "kv_transfers": transfers,
            "kv_transfer_bytes_per_request": delta("kv_transfer_bytes_total") / transfers,
            "kv_load_fallbacks": delta("kv_load_fallbacks_total"),
            "kv_transfer_exposed_ms_mean": 1e3 * exposed_sum / exposed_count if exposed_count else None,
            "kv_transfer_share_of_ttft": exposed_sum / figures["ttft_seconds_sum"]
            if figures["ttft_seconds_sum"] > 0 else None,
        })
    return figures
