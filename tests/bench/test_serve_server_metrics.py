"""`kvflow bench serve`'s server section: per-run figures from two scrapes of the server's /metrics."""

from __future__ import annotations

import pytest

from kvflow.bench.serve.server_metrics import parse, run_figures
from kvflow.server.metrics import ServerMetrics


def test_run_figures_difference_the_servers_own_series() -> None:
    metrics = ServerMetrics("m")
    metrics.ttft.observe(9.0)  # before the run (an earlier run, the probe): must fall out
    metrics.kv_transferred(1000, 1100, 0.5)
    metrics.kv_transfer_exposed(1.0)
    before = parse(metrics.render().decode())
    for ttft, exposed in ((0.2, 0.02), (0.4, 0.06)):
        metrics.ttft.observe(ttft)
        metrics.kv_transferred(4000, 4160, 0.1)
        metrics.kv_transfer_exposed(exposed)
    figures = run_figures(before, parse(metrics.render().decode()))
    assert figures is not None
    assert figures["requests_with_first_token"] == 2
    assert figures["kv_transfers"] == 2
    assert figures["kv_transfer_bytes_per_request"] == 4160
    assert figures["kv_transfer_exposed_ms_mean"] == pytest.approx(40.0)
    assert figures["kv_transfer_share_of_ttft"] == pytest.approx(0.08 / 0.6)
    assert figures["kv_load_fallbacks"] == 0


def test_colocated_and_foreign_servers() -> None:
    metrics = ServerMetrics("m")
    before = parse(metrics.render().decode())
    metrics.ttft.observe(0.1)
    figures = run_figures(before, parse(metrics.render().decode()))
    assert figures is not None and "kv_transfers" not in figures  # colocated: no transfer section
    assert parse("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3\n") == {}
    assert run_figures(None, {"kvflow:x": 1.0}) is None
