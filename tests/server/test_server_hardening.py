"""What a hostile client found (issue "Server hardening"): slow request work off the event loop,
the tokenizer routes behind the API key, 400 for requests that can never be admitted, and
`--max-waiting-requests` bounding the requests that wait."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.server.server_utils import ServerProcess
from tests.server.test_server_errors import assert_error

COMPLETIONS = "/v1/completions"
#: How long /health may take while another request's slow work runs (the loop is free: a few ms).
HEALTH_BOUND_S = 0.5
AUTH = {"Authorization": "Bearer sekret"}


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    """One server for the module (starting one costs seconds): an API key, an 8 MiB body limit, at most
    2 sequences waiting, a 16-token step budget, a served name, a 512-token context."""
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("hardening") / "serve.log", "--api-key", "sekret",
                         "--max-request-bytes", str(8 << 20), "--max-waiting-requests", "2",
                         "--max-num-batched-tokens", "16", "--served-model-name", "tiny-llama",
                         "--max-model-len", "512")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop(timeout=10)


def _while_running(url: str, work: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run `work` in a thread while polling /health; returns its result, its seconds, and the slowest
    /health answer meanwhile."""
    result: dict[str, Any] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            result["value"] = work()
        finally:
            result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    slowest = 0.0
    with httpx.Client(base_url=url, timeout=30) as http:  # /health needs no API key
        while thread.is_alive():
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.02)
    thread.join()
    return result["value"], result["seconds"], slowest


def test_a_huge_prompt_is_refused_without_stalling_the_server(srv):
    """A 7 MB prompt (under an 8 MiB body limit) is a 400 in well under a second, since only prefixes
    are tokenised, and /health and a concurrent stream keep answering meanwhile (it took 8.4 s, with
    everything stalled, when the whole prompt was tokenised on the event loop)."""
    huge = {"prompt": "a " * 3_500_000, "max_tokens": 1}
    chunk_times: list[float] = []
    started = threading.Event()

    def consume() -> None:
        body = {"prompt": "hello", "max_tokens": 500, "ignore_eos": True, "stream": True, "temperature": 0}
        with httpx.stream("POST", srv.url + COMPLETIONS, json=body, headers=AUTH, timeout=60) as stream:
            for line in stream.iter_lines():
                if line:
                    chunk_times.append(time.monotonic())
                    started.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(30)
    sent = time.monotonic()
    response, seconds, slowest = _while_running(srv.url, lambda: httpx.post(srv.url + COMPLETIONS, json=huge,
                                                                            headers=AUTH, timeout=60))
    consumer.join()
    error = assert_error(response, 400, "invalid_request_error", "prompt", "context_length_exceeded")
    assert "maximum context length is 512 tokens" in error["message"]
    assert seconds < 3.0, f"the refusal took {seconds:.1f} s"
    assert slowest < HEALTH_BOUND_S, f"/health took {slowest:.2f} s while the prompt was refused"
    # The stream's gaps while the huge request was in flight (its upload and refusal): none stalls.
    done = sent + seconds
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:]) if b > sent and a < done]
    if chunk_times[-1] > done:  # the stream outlived the huge request (it nearly always does)
        assert gaps and max(gaps) < 1.0, f"the stream stalled for {max(gaps or [0]):.2f} s"


def test_a_long_conversation_is_refused_before_full_tokenisation(srv):
    messages = [{"role": "user", "content": "b " * 2_000_000}]
    start = time.monotonic()
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, headers=AUTH,
                   timeout=60)
    assert_error(r, 400, "invalid_request_error", "messages", "context_length_exceeded")
    assert time.monotonic() - start < 3.0


def test_tokenize_runs_off_the_loop_and_needs_the_api_key(srv, model_dir):
    """With --api-key, /tokenize and /detokenize are 401 without it (an unauthenticated 7 MB
    /tokenize held the server for 12.7 s); with it, a 1 MB text is tokenised off the event loop:
    /health answers meanwhile, and the count is the tokenizer's."""
    from transformers import AutoTokenizer

    text = "hello world " * 90_000
    for path, body in (("/tokenize", {"prompt": text}), ("/detokenize", {"tokens": [1, 2, 3]})):
        r = httpx.post(srv.url + path, json=body, timeout=30)
        assert_error(r, 401, "authentication_error", None, "invalid_api_key")
    auth = AUTH
    response, _, slowest = _while_running(srv.url, lambda: httpx.post(
        srv.url + "/tokenize", json={"prompt": text}, headers=auth, timeout=120))
    assert response.status_code == 200, response.text
    want = AutoTokenizer.from_pretrained(str(model_dir)).encode(text)
    assert response.json()["count"] == len(want) and response.json()["tokens"][:50] == want[:50]
    assert slowest < HEALTH_BOUND_S, f"/health took {slowest:.2f} s during /tokenize"
    r = httpx.post(srv.url + "/detokenize", json={"tokens": want[:5]}, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["prompt"].startswith("hello")


def test_a_request_that_can_never_be_admitted_is_a_400_not_a_503(srv):
    """More prompts (or n) than may ever wait at once: 400 with the reason, which clients do not retry
    (the OpenAI client retries 503s); a request within the bound is served."""
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
        rejected = _overloaded(http)
        r = http.post(COMPLETIONS, json={"prompt": ["x"] * 3, "max_tokens": 1})
        error = assert_error(r, 400, "invalid_request_error", "prompt", "request_too_large")
        assert "3 sequences" in error["message"] and "--max-waiting-requests" in error["message"]
        r = http.post(COMPLETIONS, json={"prompt": "x", "n": 3, "max_tokens": 1})
        assert_error(r, 400, "invalid_request_error", "n", "request_too_large")
        r = http.post(COMPLETIONS, json={"prompt": ["x"] * 2, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert _overloaded(http) == rejected  # none of these was a 503


def _overloaded(http: httpx.Client) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines()
             if line.startswith("kvflow:request_rejected_total") and 'reason="overloaded"' in line]
    return sum(float(line.split()[-1]) for line in lines)


def test_max_waiting_requests_alone_bounds_the_requests_that_wait(srv):
    """With the default --max-num-seqs, --max-waiting-requests 2 admits two requests the core has not
    started and refuses the rest with 503 + Retry-After (the core is frozen, so none starts); before,
    the bound counted running sequences too (128 + 2) and never refused. Both admitted ones complete
    once the core runs again, and the KV cache empties."""
    body = {"prompt": [5 + i % 50 for i in range(20)], "max_tokens": 8, "ignore_eos": True}
    core = srv.core_pid()
    os.kill(core, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as pool:
            admitted = [pool.submit(httpx.post, srv.url + COMPLETIONS, json=body, headers=AUTH, timeout=120)
                        for _ in range(2)]
            time.sleep(1.0)  # both reach the API process and are sent to the frozen core: they wait
            r = httpx.post(srv.url + COMPLETIONS, json=body, headers=AUTH, timeout=10)
            error = assert_error(r, 503, "service_unavailable", None, "overloaded")
            assert "2 sequences are waiting to start, at most 2" in error["message"]
            assert int(r.headers["Retry-After"]) >= 1
            os.kill(core, signal.SIGCONT)
            for future in admitted:
                assert future.result().status_code == 200
                assert future.result().json()["usage"]["completion_tokens"] == 8
    finally:
        os.kill(core, signal.SIGCONT)
    after = "kvflow:kv_cache_usage_perc"
    for _ in range(50):
        metrics = httpx.get(srv.url + "/metrics").text
        usage = [line for line in metrics.splitlines() if line.startswith(after)]
        if usage and float(usage[0].split()[-1]) == 0.0:
            break
        time.sleep(0.1)
    assert usage and float(usage[0].split()[-1]) == 0.0


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_waiting_requests_below_one_is_refused(start_server, value):
    with pytest.raises(RuntimeError, match="max-waiting-requests must be >= 1"):
        start_server("--max-waiting-requests", value)


def test_models_does_not_show_the_server_path(srv, model_dir):
    """`root` is the model as clients name it, not the server's directory."""
    r = httpx.get(srv.url + "/v1/models", headers=AUTH, timeout=10)
    assert str(model_dir) not in r.text
    card = r.json()["data"][0]
    assert card["id"] == card["root"] == "tiny-llama"
