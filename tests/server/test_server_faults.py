"""Client disconnects free KV blocks; a dead engine core is reported; SIGTERM drains and leaves no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack

import httpx
import openai
import pytest

from tests.server.server_utils import group_members


def metric(url: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) from /metrics."""
    total, found = 0.0, False
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} not in /metrics"
    return total


def finished_count(url: str, reason: str) -> float:
    """Requests that ended with `reason` (stop, length, abort...) so far."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith("kvflow:request_success_total{") and f'finished_reason="{reason}"' in line)


def abort_count(url: str) -> float:
    return finished_count(url, "abort")


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_disconnects_abort_requests_and_free_kv_blocks(server):
    aborted_before = abort_count(server.url)
    body = {"prompt": "hi", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "ignore_eos": True}

    core = server.core_pid()

    async def hang_up_mid_stream() -> str:
        """Open 12 streams at once, read one chunk of each, freeze the core, read the KV usage, hang up."""
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http, AsyncExitStack() as stack:
            async def open_one(i: int) -> None:
                path, payload = ("/v1/chat/completions", chat) if i % 4 == 0 else ("/v1/completions", body)
                response = await stack.enter_async_context(
                    http.stream("POST", path, json={**payload, "stream": True}))
                assert response.status_code == 200
                await anext(response.aiter_lines())

            await asyncio.gather(*(open_one(i) for i in range(12)))
            # Frozen a few steps into 100+: the hang-ups, not the ends, must stop the streams. A stream's
            # first line can come before the core's first step has reported its KV use (a chat's role
            # chunk), and a fast core can finish every stream between a look at the metrics and a freeze:
            # so freeze now, and let the core run in slices of a few ms until, frozen, it shows blocks held.
            os.kill(core, signal.SIGSTOP)
            for _ in range(200):
                text = (await http.get("/metrics")).text
                if any(line.startswith("kvflow:kv_cache_usage") and float(line.rsplit(" ", 1)[1]) > 0
                       for line in text.splitlines()):
                    break
                os.kill(core, signal.SIGCONT)
                await asyncio.sleep(0.003)
                os.kill(core, signal.SIGSTOP)
            return text

    try:
        text = asyncio.run(hang_up_mid_stream())
        time.sleep(0.3)  # the API process notices the hang-ups and queues the aborts
    finally:
        os.kill(core, signal.SIGCONT)
    usage = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("kvflow:kv_cache_usage")]
    assert usage and usage[0] > 0

    def idle() -> bool:
        return (metric(server.url, "kvflow:kv_cache_usage_perc") == 0
                and metric(server.url, "kvflow:num_requests_running") == 0
                and metric(server.url, "kvflow:num_requests_waiting") == 0)

    assert wait_for(idle), httpx.get(f"{server.url}/metrics").text
    assert abort_count(server.url) - aborted_before == 12  # aborted, not finished
    # The server still answers normally.
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_non_streaming_hang_ups_abort_requests(start_server):
    """Clients that send a non-streaming request and close the socket while it waits abort it.

    The engine core is frozen for the whole hang-up, so the requests are surely still unfinished
    however fast the model decodes: they must end as aborts, never as full-length completions.
    """
    srv = start_server("--max-model-len", "512")
    aborted_before = abort_count(srv.url)
    completed_before = finished_count(srv.url, "length")
    payload = json.dumps({"prompt": "hi", "max_tokens": 500, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    core = srv.core_pid()
    os.kill(core, signal.SIGSTOP)
    try:
        sockets = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
        for sock in sockets:
            sock.sendall(head + payload)
        time.sleep(0.5)  # the API process takes the requests and forwards them to the frozen core
        for sock in sockets:
            sock.close()
        time.sleep(0.5)  # ... notices the hang-ups and sends the aborts after them
    finally:
        os.kill(core, signal.SIGCONT)
    assert wait_for(lambda: abort_count(srv.url) - aborted_before == 4), httpx.get(f"{srv.url}/metrics").text
    assert wait_for(lambda: metric(srv.url, "kvflow:kv_cache_usage_perc") == 0)
    assert metric(srv.url, "kvflow:num_requests_running") == 0
    assert finished_count(srv.url, "length") == completed_before
    # The server still answers normally.
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_engine_death_fails_requests_promptly_and_health_reports_it(start_server):
    srv = start_server("--max-model-len", "512")
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=30)
    core = srv.core_pid()
    # Frozen first, so both requests are surely in flight when it dies, however fast decoding is.
    os.kill(core, signal.SIGSTOP)

    def stream_all() -> None:
        stream = client.completions.create(model=None, prompt="hi", max_tokens=480, stream=True,
                                           extra_body={"ignore_eos": True})
        for _ in stream:
            pass

    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream_all)
        pending = pool.submit(httpx.post, f"{srv.url}/v1/completions",
                              json={"prompt": "hello", "max_tokens": 480, "ignore_eos": True}, timeout=30)
        time.sleep(0.5)  # both requests reach the API process, which forwards them to the frozen core
        os.kill(core, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="engine"):
            streamed.result()
        plain = pending.result()
    assert time.monotonic() - started < 5
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_dead"
    health = httpx.get(f"{srv.url}/health")
    assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
    again = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
    assert "engine core process died (killed by SIGKILL)" in srv.log()
    assert srv.stop() == 0
    assert wait_for(lambda: not group_members(srv.proc.pid), timeout=10), group_members(srv.proc.pid)


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(start_server):
    srv = start_server("--max-model-len", "512", "--shutdown-timeout", "60")
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
    stream = client.completions.create(model=None, prompt="hi", max_tokens=64, stream=True, temperature=0,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    srv.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            httpx.get(f"{srv.url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            return False
        return False

    assert wait_for(refused, timeout=5)  # no new connections while draining
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 64  # the in-flight request finished in full
    assert srv.proc.wait(30) == 0
    assert "engine core stopped" in srv.log()
    assert wait_for(lambda: not group_members(srv.proc.pid), timeout=10), group_members(srv.proc.pid)
