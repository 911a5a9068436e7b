"""Bad requests get their exact status and an OpenAI-style error body; the server stays healthy.

Also: API keys (401), overload (503 + Retry-After) on a server with a tiny queue.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ERROR_KEYS = {"message", "type", "param", "code"}
LONG = "word " * 400  # well over the 128-token context
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]

# (id, path, body: dict (JSON) or bytes (raw), status, error type, param, code)
CASES = [
    ("malformed-json", COMPLETIONS, b'{"prompt": "hi",', 400, "invalid_request_error", None, "invalid_value"),
    ("invalid-utf8", COMPLETIONS, b'{"prompt": "\xff\xfe"}', 400, "invalid_request_error", None, "invalid_encoding"),
    ("lone-surrogate", COMPLETIONS, b'{"prompt": "a\\ud800b"}', 400, "invalid_request_error", None, "invalid_value"),
    ("json-array-body", COMPLETIONS, b"[1, 2]", 400, "invalid_request_error", None, "invalid_value"),
    ("not-json-content-type", COMPLETIONS, b"prompt=hi", 400, "invalid_request_error", None, "invalid_value"),
    ("missing-prompt", COMPLETIONS, {"max_tokens": 2}, 400, "invalid_request_error", "prompt", "invalid_value"),
    ("prompt-wrong-type", COMPLETIONS, {"prompt": 5}, 400, "invalid_request_error", "prompt", "invalid_value"),
    ("prompt-null", COMPLETIONS, {"prompt": None}, 400, "invalid_request_error", "prompt", "invalid_value"),
    ("empty-prompt", COMPLETIONS, {"prompt": ""}, 400, "invalid_request_error", None, "invalid_value"),
    ("empty-prompt-list", COMPLETIONS, {"prompt": []}, 400, "invalid_request_error", "prompt", None),
    ("token-outside-vocab", COMPLETIONS, {"prompt": [1, 99999]}, 400, "invalid_request_error", None, "invalid_value"),
    ("prompt-over-context", COMPLETIONS, {"prompt": LONG}, 400, "invalid_request_error", "prompt",
     "context_length_exceeded"),
    ("prompt-fills-context", COMPLETIONS, {"prompt": list(range(3, 131))}, 400, "invalid_request_error", "prompt",
     "context_length_exceeded"),
    ("max-tokens-over-context", COMPLETIONS, {"prompt": "hi", "max_tokens": 1000}, 400, "invalid_request_error",
     "max_tokens", "context_length_exceeded"),
    ("max-tokens-zero", COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "invalid_request_error", "max_tokens",
     "invalid_value"),
    ("temperature-negative", COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400, "invalid_request_error",
     "temperature", "invalid_value"),
    ("temperature-string", COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "invalid_request_error",
     "temperature", "invalid_value"),
    ("top-p-over-1", COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, 400, "invalid_request_error", "top_p",
     "invalid_value"),
    ("n-zero", COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "invalid_request_error", "n", "invalid_value"),
    ("n-over-limit", COMPLETIONS, {"prompt": "hi", "n": 1000}, 400, "invalid_request_error", "n", "invalid_value"),
    ("logprobs-over-20", COMPLETIONS, {"prompt": "hi", "logprobs": 50}, 400, "invalid_request_error", "logprobs",
     "invalid_value"),
    ("penalty-out-of-range", COMPLETIONS, {"prompt": "hi", "frequency_penalty": 3}, 400, "invalid_request_error",
     "frequency_penalty", "invalid_value"),
    ("seed-too-large", COMPLETIONS, {"prompt": "hi", "seed": 2**70}, 400, "invalid_request_error", "seed",
     "invalid_value"),
    ("top-k-too-large", COMPLETIONS, {"prompt": "hi", "top_k": 2**70}, 400, "invalid_request_error", "top_k",
     "invalid_value"),
    ("min-over-max-tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400,
     "invalid_request_error", "min_tokens", "invalid_value"),
    ("stop-token-ids-strings", COMPLETIONS, {"prompt": "hi", "stop_token_ids": ["a"]}, 400,
     "invalid_request_error", "stop_token_ids", "invalid_value"),
    ("unknown-model", COMPLETIONS, {"prompt": "hi", "model": "gpt-17"}, 404, "not_found_error", "model",
     "model_not_found"),
    ("chat-empty-messages", CHAT, {"messages": []}, 400, "invalid_request_error", "messages", "invalid_value"),
    ("chat-messages-not-list", CHAT, {"messages": "hi"}, 400, "invalid_request_error", "messages", "invalid_value"),
    ("chat-bad-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request_error",
     "messages", "invalid_value"),
    ("chat-top-logprobs-alone", CHAT, {"messages": HI, "top_logprobs": 2}, 400, "invalid_request_error",
     "top_logprobs", None),
    ("chat-unknown-model", CHAT, {"messages": HI, "model": "nope"}, 404, "not_found_error", "model",
     "model_not_found"),
    ("chat-over-context", CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "invalid_request_error",
     "messages", "context_length_exceeded"),
    ("detokenize-outside-vocab", "/detokenize", {"tokens": [-1]}, 400, "invalid_request_error", "tokens", None),
    ("unknown-route", "/v1/embeddings", {"input": "hi"}, 404, "not_found_error", None, None),
    ("body-too-large", COMPLETIONS, {"prompt": "x" * (2 << 20)}, 413, "invalid_request_error", None,
     "request_too_large"),
]


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None, code: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type_, param, code), error
    return error


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("name,path,body,status,type_,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_request_table(http, name, path, body, status, type_, param, code):
    if isinstance(body, bytes):
        ctype = "text/plain" if name == "not-json-content-type" else "application/json"
        response = http.post(path, content=body, headers={"content-type": ctype})
    else:
        response = http.post(path, json=body)
    assert_error(response, status, type_, param, code)
    ok = http.post(COMPLETIONS, json={"prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
    assert http.get("/health").status_code == 200


def test_wrong_method_is_an_openai_error(http):
    assert_error(http.get(COMPLETIONS), 405, "invalid_request_error", None, None)


def test_api_key_and_overload(start_server):
    srv = start_server("--api-key", "sekret", "--max-num-seqs", "1", "--max-waiting-requests", "1",
                       "--max-model-len", "512")
    auth = {"Authorization": "Bearer sekret"}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}, headers=headers)
            assert_error(r, 401, "authentication_error", None, "invalid_api_key")
        assert_error(http.get("/v1/models"), 401, "authentication_error", None, "invalid_api_key")
        assert http.get("/health").status_code == 200  # not under /v1
        assert http.get("/v1/models", headers=auth).status_code == 200

        # The core is frozen, so nothing starts: one request waits (the most --max-waiting-requests 1
        # allows), the next gets 503 + Retry-After; both finish once the core runs again.
        core = srv.core_pid()
        os.kill(core, signal.SIGSTOP)
        body = {"prompt": "hi", "max_tokens": 8, "ignore_eos": True}
        try:
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(http.post, COMPLETIONS, json=body, headers=auth)
                time.sleep(0.5)  # it reaches the API process and is sent to the frozen core
                r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}, headers=auth)
                assert_error(r, 503, "service_unavailable", None, "overloaded")
                assert "1 sequences are waiting to start, at most 1" in r.json()["error"]["message"]
                assert int(r.headers["Retry-After"]) >= 1
                os.kill(core, signal.SIGCONT)
                assert waiting.result().status_code == 200
        finally:
            os.kill(core, signal.SIGCONT)
        for _ in range(50):
            r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}, headers=auth)
            if r.status_code == 200:
                break
        assert r.status_code == 200, r.text
        metrics = http.get("/metrics").text
        assert 'kvflow:request_rejected_total{model_name=' in metrics and 'reason="overloaded"' in metrics


def test_bad_streaming_request_is_refused_before_the_stream(http):
    """Validation happens before the stream starts: a bad streaming request is a plain 400, not SSE."""
    r = http.post(COMPLETIONS, json={"prompt": "hi", "stream": True, "temperature": -2})
    assert_error(r, 400, "invalid_request_error", "temperature", "invalid_value")
    lines = [json.loads(line[6:]) for line in http.post(
        COMPLETIONS, json={"prompt": "hi", "stream": True, "max_tokens": 2}).text.splitlines()
        if line.startswith("data: {")]
    assert lines and all("error" not in line for line in lines)
