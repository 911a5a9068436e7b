"""``kvflow bench soak``: a reliability soak against a live OpenAI-compatible server.

Sends a seeded mix of requests — well-formed completions and chats (random ``n``, lengths,
streaming or not), streams the client abandons after a few chunks, plain requests the client
gives up on, and malformed bodies of many kinds — with a bounded concurrency, while sampling the
resident memory of the server and its child processes. At the end it waits for the server to be
idle and reads its KV-cache usage back. What it shows: no 5xx (503 ``overloaded``, load that passes,
is counted apart), every refusal an OpenAI error body, no leaked KV blocks, memory that stops
growing.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvflow.bench.serve.server_metrics import scrape

#: Kinds of request in the mix, with their weights.
MIX = {"complete": 30, "chat": 10, "stream": 20, "abandon_stream": 15, "abandon_wait": 10, "malformed": 15}


@dataclass
class SoakConfig:
    base_url: str
    num_requests: int = 1000
    concurrency: int = 16
    seed: int = 0
    api_key: str | None = None
    model: str | None = None
    max_tokens: int = 32
    pids: list[int] = field(default_factory=list)
    settle_timeout: float = 60.0
    duration: float = 0.0  # > 0: starts spread over this many seconds (Poisson arrivals); 0: back to back


@dataclass
class Outcome:
    kind: str
    status: int  # 0: the client gave up on purpose
    code: str | None
    seconds: float


def malformed_bodies(model: str) -> list[tuple[str, str, bytes]]:
    """(name, path, raw body): bodies a careless or hostile client sends."""
    deep = b"[" * 100_000 + b"]" * 100_000

    def js(path: str, body: Any) -> tuple[str, bytes]:
        return path, json.dumps(body).encode()

    cases: list[tuple[str, tuple[str, bytes]]] = [
        ("not json", ("/v1/completions", b"{not json")),
        ("empty body", ("/v1/completions", b"")),
        ("a list", js("/v1/completions", [])),
        ("deeply nested", ("/v1/completions", deep)),
        ("bad utf-8", ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 1}')),
        ("prompt a number", js("/v1/completions", {"prompt": 123})),
        ("empty prompt", js("/v1/completions", {"prompt": ""})),
        ("empty list", js("/v1/completions", {"prompt": []})),
        ("negative id", js("/v1/completions", {"prompt": [-5, 3]})),
        ("id past vocab", js("/v1/completions", {"prompt": [10**9]})),
        ("negative max_tokens", js("/v1/completions", {"prompt": "hi", "max_tokens": -1})),
        ("huge max_tokens", js("/v1/completions", {"prompt": "hi", "max_tokens": 10**9})),
        ("temperature a word", js("/v1/completions", {"prompt": "hi", "temperature": "hot"})),
        ("top_p 2", js("/v1/completions", {"prompt": "hi", "top_p": 2})),
        ("n 0", js("/v1/completions", {"prompt": "hi", "n": 0})),
        ("n 10^9", js("/v1/completions", {"prompt": "hi", "n": 10**9})),
        ("logprobs 99", js("/v1/completions", {"prompt": "hi", "logprobs": 99})),
        ("unknown model", js("/v1/completions", {"prompt": "hi", "model": "no-such-model"})),
        ("stream a word", js("/v1/completions", {"prompt": "hi", "stream": "yes"})),
        ("stop list of 1000", js("/v1/completions", {"prompt": "hi", "stop": ["x"] * 1000})),
        ("seed a float", js("/v1/completions", {"prompt": "hi", "seed": 1.5})),
        ("chat without messages", js("/v1/chat/completions", {"messages": []})),
        ("chat bad role", js("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})),
        ("chat content a number", js("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]})),
        ("prompts for chat", js("/v1/chat/completions", {"prompt": "hi"})),
        ("tokenize nothing", js("/tokenize", {})),
        ("detokenize past vocab", js("/detokenize", {"tokens": [10**9]})),
    ]
    return [(name, path, body) for name, (path, body) in cases]


class MemorySampler:
    """Resident memory (VmRSS) of the given processes and their descendants, sampled periodically."""

    def __init__(self, pids: list[int], interval: float = 0.5) -> None:
        self.pids, self.interval = pids, interval
        self.samples: list[tuple[float, dict[int, int]]] = []

    @staticmethod
    def _tree(pid: int) -> list[int]:
        found, todo = [], [pid]
        while todo:
            p = todo.pop()
            found.append(p)
            for task in Path(f"/proc/{p}/task").glob("*/children"):
                try:
                    todo += [int(c) for c in task.read_text().split()]
                except OSError:
                    pass
        return found

    @staticmethod
    def _rss(pid: int) -> int | None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def sample(self) -> None:
        now = time.monotonic()
        rss = {}
        for root in self.pids:
            for pid in self._tree(root):
                value = self._rss(pid)
                if value is not None:
                    rss[pid] = value
        self.samples.append((now, rss))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass
        self.sample()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per process: MiB at the start, at the peak, at the end, and the growth over the run's second
        half (what a leak would show; the first half includes warm-up allocations)."""
        out: dict[str, dict[str, float]] = {}
        pids = sorted({pid for _, rss in self.samples for pid in rss})
        half = self.samples[len(self.samples) // 2][0] if self.samples else 0.0
        for pid in pids:
            series = [(t, rss[pid]) for t, rss in self.samples if pid in rss]
            if not series:
                continue
            mid = next((v for t, v in series if t >= half), series[-1][1])
            out[str(pid)] = {"start_mib": series[0][1] / 2**20, "peak_mib": max(v for _, v in series) / 2**20,
                             "end_mib": series[-1][1] / 2**20, "second_half_growth_mib": (series[-1][1] - mid) / 2**20}
        return out


async def _metrics(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    """The server's kvflow series (label sets summed): the serve bench's scraper."""
    return await scrape(session, base_url) or {}


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.outcomes: list[Outcome] = []
        self.model = config.model
        self.malformed = malformed_bodies(config.model or "")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def _plan(self) -> list[str]:
        kinds, weights = zip(*MIX.items())
        return self.rng.choices(kinds, weights, k=self.config.num_requests)

    def _arrivals(self) -> list[float]:
        """Seconds after the start at which each request is sent: a seeded Poisson process of rate
        num_requests / duration, or all at once (the concurrency cap paces them)."""
        n, duration = self.config.num_requests, self.config.duration
        if duration <= 0:
            return [0.0] * n
        rng, t, times = random.Random(self.config.seed + 1), 0.0, []
        for _ in range(n):
            t += rng.expovariate(n / duration)
            times.append(t)
        return times

    def _body(self, rng: random.Random, chat: bool, stream: bool) -> tuple[str, dict[str, Any]]:
        words = ["alpha", "beta", "gamma", "delta", "the", "a", "cat", "runs", "42", "!"]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # short: fits small contexts
        body: dict[str, Any] = {"model": self.model, "max_tokens": rng.randint(1, self.config.max_tokens),
                                "n": rng.choice([1, 1, 1, 2, 3]), "temperature": rng.choice([0.0, 0.7, 1.0]),
                                "stream": stream, "ignore_eos": rng.random() < 0.5}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
            return "/v1/chat/completions", body
        body["prompt"] = text if rng.random() < 0.7 else [rng.randint(3, 200) for _ in range(rng.randint(1, 32))]
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 3)
        return "/v1/completions", body

    async def _one(self, session: aiohttp.ClientSession, kind: str, index: int) -> Outcome:
        # Each request draws from its own seeded generator: the mix does not depend on scheduling.
        base, start, rng = self.config.base_url, time.monotonic(), random.Random(self.config.seed * 1_000_003 + index)
        status, code = 0, None
        try:
            if kind == "malformed":
                _, path, raw = rng.choice(self.malformed)
                async with session.post(base + path, data=raw, headers=self._headers()) as r:
                    status, code = r.status, await _error_code(r)
            elif kind in ("complete", "chat", "abandon_wait"):
                path, body = self._body(rng, kind == "chat", stream=False)
                timeout = aiohttp.ClientTimeout(total=rng.uniform(0.02, 0.3)) if kind == "abandon_wait" else None
                try:
                    async with session.post(base + path, json=body, headers=self._headers(), timeout=timeout) as r:
                        status, code = r.status, await _error_code(r)
                except TimeoutError:
                    status = 0  # gave up on purpose: the server must abort it
            else:
                path, body = self._body(rng, rng.random() < 0.3, stream=True)
                keep = rng.randint(1, 4) if kind == "abandon_stream" else None
                async with session.post(base + path, json=body, headers=self._headers()) as r:
                    status = r.status
                    if r.status != 200:
                        code = await _error_code(r)
                    else:
                        chunks = 0
                        async for line in r.content:
                            if line.startswith(b"data:"):
                                chunks += 1
                                error = _event_error_code(line)  # parsed: a token "error" in logprobs is not one
                                if error is not None:
                                    code = "stream_error:" + error
                            if keep is not None and chunks >= keep:
                                r.close()  # hang up mid-stream
                                status = 0
                                break
        except aiohttp.ClientError as exc:
            status, code = -1, type(exc).__name__
        return Outcome(kind, status, code, time.monotonic() - start)

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        sampler = MemorySampler(cfg.pids)
        stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=cfg.concurrency * 2)
        async with aiohttp.ClientSession(connector=connector) as session:
            if self.model is None:
                async with session.get(cfg.base_url + "/v1/models", headers=self._headers()) as r:
                    self.model = (await r.json())["data"][0]["id"]
            sampling = asyncio.create_task(sampler.run(stop))
            semaphore = asyncio.Semaphore(cfg.concurrency)
            start = time.monotonic()

            async def bounded(index: int, kind: str, at: float) -> None:
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                async with semaphore:
                    self.outcomes.append(await self._one(session, kind, index))

            await asyncio.gather(*(bounded(i, kind, at)
                                   for i, (kind, at) in enumerate(zip(self._plan(), self._arrivals()))))
            duration = time.monotonic() - start
            idle, settled_after = await self._settle(session)
            stop.set()
            await sampling
            final = await _metrics(session, cfg.base_url)
        return self._result(duration, idle, settled_after, final, sampler)

    async def _settle(self, session: aiohttp.ClientSession) -> tuple[bool, float]:
        """Wait until nothing runs or waits and the KV cache is empty (aborts land a step later)."""
        start = time.monotonic()
        while time.monotonic() - start < self.config.settle_timeout:
            m = await _metrics(session, self.config.base_url)
            busy = m.get("kvflow:num_requests_running", 0) + m.get("kvflow:num_requests_waiting", 0)
            if busy == 0 and m.get("kvflow:kv_cache_usage_perc", 0.0) == 0.0:
                return True, time.monotonic() - start
            await asyncio.sleep(0.2)
        return False, time.monotonic() - start

    def _result(self, duration: float, idle: bool, settled_after: float, final: dict[str, float],
                sampler: MemorySampler) -> dict[str, Any]:
        by_kind: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            by_kind.setdefault(o.kind, Counter())[str(o.status)] += 1
        server_errors = [o for o in self.outcomes
                         if o.status >= 500 and not (o.status == 503 and o.code == "overloaded")]
        return {
            "config": {k: v for k, v in vars(self.config).items()},
            "requests": len(self.outcomes), "seconds": duration,
            "statuses": dict(Counter(str(o.status) for o in self.outcomes)),
            "by_kind": {k: dict(v) for k, v in by_kind.items()},
            "server_errors": [vars(o) for o in server_errors],
            "overloaded_503": sum(o.status == 503 and o.code == "overloaded" for o in self.outcomes),
            "client_errors": sum(o.status == -1 for o in self.outcomes),
            "stream_errors": sum((o.code or "").startswith("stream_error") for o in self.outcomes),
            "stream_error_codes": dict(Counter(o.code for o in self.outcomes
                                               if (o.code or "").startswith("stream_error"))),
            "refusals_without_error_body": sum(o.code == "no_error_body" for o in self.outcomes),
            # A well-formed request refused with a 4xx is a bug in the server (or in this mix).
            "unexpected_refusals": [vars(o) for o in self.outcomes
                                    if o.kind != "malformed" and 400 <= o.status < 500],
            "idle_after": idle, "settled_seconds": settled_after,
            "kv_cache_usage_after": final.get("kvflow:kv_cache_usage_perc"),
            "memory": sampler.summary(),
        }


async def _error_code(response: aiohttp.ClientResponse) -> str | None:
    """The OpenAI error body's code (None for a success); 'no_error_body' when a refusal lacks one."""
    data = await response.read()
    if response.status < 400:
        return None
    try:
        error = json.loads(data)["error"]
        return error.get("code") or error.get("type")
    except (ValueError, KeyError, TypeError):
        return "no_error_body"


def _event_error_code(line: bytes) -> str | None:
    """The code of an SSE error event (`data: {"error": {...}}`); None for any other event."""
    payload = line.split(b":", 1)[1].strip()
    if payload == b"[DONE]":
        return None
    try:
        event = json.loads(payload)
    except ValueError:
        return "unparsable_event"
    error = event.get("error") if isinstance(event, dict) else None
    if error is None:
        return None
    return str(error.get("code") or error.get("type")) if isinstance(error, dict) else "error"


def run_soak(config: SoakConfig) -> dict[str, Any]:
    return asyncio.run(Soak(config).run())


def format_report(result: dict[str, Any]) -> str:
    lines = [f"soak: {result['requests']} requests in {result['seconds']:.1f} s",
             f"statuses: {dict(sorted(result['statuses'].items()))}  (0: the client hung up on purpose)"]
    for kind, counts in sorted(result["by_kind"].items()):
        lines.append(f"  {kind:<15} {dict(sorted(counts.items()))}")
    lines.append(f"5xx other than 503 overloaded: {len(result['server_errors'])}; 503 overloaded: "
                 f"{result['overloaded_503']}; connection errors: {result['client_errors']}; "
                 f"error events in streams: {result['stream_errors']} {result['stream_error_codes'] or ''}; "
                 f"refusals without an OpenAI error "
                 f"body: {result['refusals_without_error_body']}; well-formed requests refused: "
                 f"{len(result['unexpected_refusals'])}")
    lines.append(f"idle afterwards: {result['idle_after']} (after {result['settled_seconds']:.1f} s), "
                 f"KV cache usage {result['kv_cache_usage_after']}")
    for pid, mem in result["memory"].items():
        lines.append(f"  pid {pid}: RSS {mem['start_mib']:.0f} -> peak {mem['peak_mib']:.0f} -> end "
                     f"{mem['end_mib']:.0f} MiB, second half {mem['second_half_growth_mib']:+.1f} MiB")
    return "\n".join(lines)


def passed(result: dict[str, Any], max_growth_mib: float = 64.0) -> bool:
    """The soak's verdict: no 5xx but overload, every refusal an error body, idle with an empty cache,
    and no process growing more than `max_growth_mib` over the second half."""
    codes_ok = (result["refusals_without_error_body"] == 0 and not result["unexpected_refusals"]
                and result["stream_errors"] == 0)  # an error event inside a 200 stream is a failure too
    growth_ok = all(m["second_half_growth_mib"] <= max_growth_mib for m in result["memory"].values())
    return (not result["server_errors"] and codes_ok and result["idle_after"]
            and result["kv_cache_usage_after"] == 0.0 and growth_ok and result["client_errors"] == 0)
