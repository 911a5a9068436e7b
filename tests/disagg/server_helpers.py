"""Shared by the end-to-end disaggregation tests: servers started per test, and what they are asked."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.server.server_utils import ServerProcess

PROMPTS = ["hi", "the quick brown fox jumps over the lazy dog " * 3, "a b c d e f g", "one " * 25]


class Servers:
    """`kvflow serve` processes on the test model, each stopped (and checked for strays) at the end."""

    def __init__(self, model: Path, log_dir: Path) -> None:
        self.model, self.log_dir = model, log_dir
        self.started: list[ServerProcess] = []

    def __call__(self, *extra: str) -> ServerProcess:
        proc = ServerProcess(self.model, self.log_dir / f"serve{len(self.started)}.log", "--max-model-len", "128",
                             *extra)
        self.started.append(proc)
        return proc.wait_ready()

    def stop_all(self, timeout: float = 20.0) -> None:
        for proc in self.started:
            proc.stop(timeout=timeout)


def complete_all(url: str, max_tokens: int = 16) -> list[tuple[str, list[str], int]]:
    """Greedy completions of PROMPTS, sent concurrently: text, token strings and token count of each."""
    def one(prompt: str) -> tuple[str, list[str], int]:
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        return choice["text"], choice["logprobs"]["tokens"], body["usage"]["completion_tokens"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def metric(url: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith((name + "{", name + " ")))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def instances(url: str) -> dict:
    return httpx.get(f"{url}/health").json()["instances"]




def kill_decode_before_first_tokens(url: str, expected: list[tuple[str, list[str], int]]) -> None:
    """Freeze the prefill instance so requests reach both instances with no token out yet, kill
    decode-0 once it holds some, resume: every request must still complete as `expected`
    (resubmitted to another decode instance)."""
    info = instances(url)
    decode0, prefill = info["decode-0"]["pid"], info["prefill-0"]["pid"]
    os.kill(prefill, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(complete_all, url)
            assert wait_until(lambda: instances(url)["decode-0"]["in_flight"] > 0)
            os.kill(decode0, signal.SIGKILL)
            assert wait_until(lambda: not instances(url)["decode-0"]["alive"])
            os.kill(prefill, signal.SIGCONT)
            assert pending.result(timeout=60) == expected  # resubmitted to decode-1
    finally:
        os.kill(prefill, signal.SIGCONT)
