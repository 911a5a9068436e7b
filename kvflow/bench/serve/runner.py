"""A whole ``kvflow bench serve`` run: find the model, build the requests, send them on schedule.

Order of work, and why:

1. ``GET /v1/models`` names the model (unless ``--model``) and, where the server reports a local
   path (``root`` on vLLM and kvflow), the tokenizer to build prompts with;
2. requests and arrival times come from seeded generators that never see the server, so every
   server gets the same stream (prompt building and the schedule use separate streams of the
   seed, so a dataset change does not move the arrival times);
3. one probe request checks the endpoint before the clock starts (and warms it up); a server that
   rejects ``ignore_eos`` gets the run without it, with a warning;
4. each request sleeps until its arrival time, then waits for a slot when ``--max-concurrency``
   is set (TTFT starts when it is actually sent; the wait is kept as ``start_s - arrival_s``).
   ``multi-turn`` schedules sessions instead of requests (``sessions``): each takes a slot for its
   life and sends its turns one after another; its probe is a prompt of its own, so no session's
   document is in the prefix cache before its first turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from kvflow.bench.serve.arrivals import arrival_offsets, offered_rate
from kvflow.bench.serve.client import RequestResult, Target, list_models, send_request
from kvflow.bench.serve.config import DEFAULT_NUM_PROMPTS, ServeBenchConfig
from kvflow.bench.serve.datasets import (
    SampleRequest,
    random_requests,
    shared_prefix_requests,
    trace_requests,
)
from kvflow.bench.serve.metrics import summarize
from kvflow.bench.serve.prompts import PromptBuilder
from kvflow.bench.serve.server_metrics import run_figures, scrape
from kvflow.bench.serve.sessions import SessionPlan, add_think_times, build_sessions, send_sessions
from kvflow.bench.serve.trace import load_trace, trace_offsets

Log = Callable[[str], None]
#: Output tokens of the probe request: enough to see streaming work, short enough to be quick.
_PROBE_TOKENS = 4
RESULT_KIND = "kvflow-bench-serve"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_tokenizer_path(explicit: str | None, models: Sequence[dict[str, Any]], model: str) -> str:
    """``--tokenizer``, else the served model's path when it is a local directory."""
    if explicit:
        return explicit
    for entry in models:
        if entry.get("id") == model:
            for candidate in (entry.get("root"), entry.get("id")):
                if candidate and Path(candidate).is_dir():
                    return str(candidate)
    if Path(model).is_dir():
        return model
    raise ValueError(
        f"cannot find a local tokenizer for model {model!r}: pass --tokenizer DIR "
        "(prompts are built to exact token counts under the served model's tokenizer)"
    )


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a directory (or a cached hub name)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoTokenizer.from_pretrained(path)


def build_requests(cfg: ServeBenchConfig, tokenizer: Any) -> tuple[list[SampleRequest], np.ndarray]:
    """The run's requests and their arrival offsets (s), both from ``cfg.seed`` only."""
    if cfg.dataset == "multi-turn":
        raise ValueError("multi-turn requests depend on the server's answers: use build_session_plans")
    data_rng = np.random.default_rng([cfg.seed, 0])
    arrival_rng = np.random.default_rng([cfg.seed, 1])
    builder = PromptBuilder(tokenizer, data_rng)
    trace_times: np.ndarray | None = None
    if cfg.dataset == "trace":
        assert cfg.trace_file is not None
        rows = load_trace(cfg.trace_file, limit=cfg.num_prompts)
        requests = trace_requests(builder, rows, cfg.max_input_len, cfg.max_output_len)
        trace_times = trace_offsets(rows, cfg.trace_time_scale)
    elif cfg.dataset == "shared-prefix":
        requests = shared_prefix_requests(
            builder, cfg.num_prompts or DEFAULT_NUM_PROMPTS, cfg.shared_prefix_len, cfg.num_prefix_groups,
            cfg.random_input_len, cfg.random_output_len, cfg.random_range_ratio, data_rng,
        )
    else:
        requests = random_requests(
            builder, cfg.num_prompts or DEFAULT_NUM_PROMPTS, cfg.random_input_len,
            cfg.random_output_len, cfg.random_range_ratio, data_rng,
        )
    if trace_times is not None and cfg.request_rate is None:
        offsets = trace_times
    else:
        rate = math.inf if cfg.request_rate is None else cfg.request_rate
        offsets = arrival_offsets(len(requests), rate, cfg.burstiness, arrival_rng)
    return requests, offsets


def build_session_plans(
    cfg: ServeBenchConfig, tokenizer: Any
) -> tuple[list[SessionPlan], np.ndarray, SampleRequest]:
    """Multi-turn: the sessions, their start offsets (s) and a probe request, all from ``cfg.seed``.

    The probe's prompt is built after the sessions from the same stream, so it changes nothing
    about them; it is a few tokens, less than a KV block, so it leaves nothing in the server's
    prefix cache that a session could hit.
    """
    data_rng = np.random.default_rng([cfg.seed, 0])
    arrival_rng = np.random.default_rng([cfg.seed, 1])
    builder = PromptBuilder(tokenizer, data_rng)
    plans = build_sessions(
        builder, cfg.num_sessions, cfg.num_turns, cfg.first_turn_len, cfg.turn_input_len,
        cfg.random_output_len, cfg.random_range_ratio, data_rng,
    )
    plans = add_think_times(plans, cfg.think_time, np.random.default_rng([cfg.seed, 2]))
    rate = math.inf if cfg.request_rate is None else cfg.request_rate
    offsets = arrival_offsets(len(plans), rate, cfg.burstiness, arrival_rng)
    probe_prompt = builder.build(min(cfg.first_turn_len, _PROBE_TOKENS))
    return plans, offsets, SampleRequest(probe_prompt.text, probe_prompt.num_tokens, _PROBE_TOKENS)


async def probe(session: aiohttp.ClientSession, target: Target, req: SampleRequest, log: Log) -> Target:
    """Send one short request; return the target to use (without ``ignore_eos`` if rejected)."""
    short = dataclasses.replace(req, output_len=min(req.output_len, _PROBE_TOKENS))
    result = await send_request(session, target, short)
    if not result.success and target.ignore_eos and "ignore_eos" in result.error:
        log("warning: the server rejects ignore_eos; sending requests without it "
            "(outputs may stop early at EOS)")
        target = dataclasses.replace(target, ignore_eos=False)
        result = await send_request(session, target, short)
    if not result.success:
        raise RuntimeError(f"probe request to {target.url} failed: {result.error}")
    return target


async def send_all(
    session: aiohttp.ClientSession,
    target: Target,
    requests: Sequence[SampleRequest],
    offsets: np.ndarray,
    max_concurrency: int | None,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival offset (at most ``max_concurrency`` in flight).

    Returns the results in request order and the run's duration: from the first arrival to the
    last completion.
    """
    from tqdm.auto import tqdm

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, desc="requests", unit="req")
    t0 = time.perf_counter()

    async def one(req: SampleRequest, offset: float) -> RequestResult:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots if slots is not None else contextlib.nullcontext():
            start = time.perf_counter() - t0
            result = await send_request(session, target, req)
        result.arrival_s = float(offset)
        result.start_s = start
        bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    finally:
        bar.close()
    return list(results), time.perf_counter() - t0


async def run_async(cfg: ServeBenchConfig, log: Log = _stderr) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` and return the result document (see ``report``)."""
    cfg.validate()
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        models: list[dict[str, Any]] = []
        try:
            models = await list_models(session, cfg.base_url, cfg.api_key)
        except (aiohttp.ClientError, RuntimeError, ValueError) as e:
            if cfg.model is None:
                raise RuntimeError(f"cannot list models at {cfg.base_url}: {e}; pass --model") from e
            log(f"warning: GET /v1/models failed ({e}); using --model {cfg.model}")
        model = cfg.model or (models[0]["id"] if models else None)
        if not model:
            raise RuntimeError(f"{cfg.base_url}/v1/models lists no model; pass --model")
        tokenizer_path = resolve_tokenizer_path(cfg.tokenizer, models, model)
        log(f"model {model!r}, tokenizer {tokenizer_path}, {cfg.url}")
        tokenizer = load_tokenizer(tokenizer_path)
        plans: list[SessionPlan] = []
        if cfg.dataset == "multi-turn":
            plans, offsets, probe_req = build_session_plans(cfg, tokenizer)
        else:
            requests, offsets = build_requests(cfg, tokenizer)
            probe_req = requests[0]
        target = Target(
            url=cfg.url, api="chat" if cfg.api == "chat" else "completions", model=model,
            api_key=cfg.api_key, ignore_eos=cfg.ignore_eos, temperature=cfg.temperature,
            extra_body=dict(cfg.extra_body),
        )
        if cfg.probe:
            target = await probe(session, target, probe_req, log)
        before = await scrape(session, cfg.base_url)
        if plans:
            log(f"sending {len(plans)} sessions x {cfg.num_turns} turns ({cfg.dataset}, prompts from "
                f"{cfg.first_turn_len} to ~{_last_turn_len(cfg)} tokens, session rate {cfg.rate_label()}, "
                f"max concurrent sessions {cfg.max_concurrency or 'none'})")
            results, duration = await send_sessions(
                session, target, plans, offsets, cfg.max_concurrency, cfg.progress
            )
        else:
            log(f"sending {len(requests)} requests ({cfg.dataset}, rate {cfg.rate_label()}, "
                f"max concurrency {cfg.max_concurrency or 'none'})")
            results, duration = await send_all(
                session, target, requests, offsets, cfg.max_concurrency, cfg.progress
            )
        server = None
        if before is not None:  # a kvflow server
            await asyncio.sleep(0.5)  # transfer acknowledgements reach the front a step after the tokens
            server = run_figures(before, await scrape(session, cfg.base_url))
    return {
        "kind": RESULT_KIND,
        "version": 1,
        "label": cfg.label or Path(model).name or model,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "model": model,
        "tokenizer": tokenizer_path,
        "dataset": cfg.dataset,
        "rate_label": cfg.rate_label(),
        "request_rate": cfg.to_dict()["request_rate"],
        "offered_rate": offered_rate(offsets),
        "ignore_eos_sent": target.ignore_eos,
        "config": cfg.to_dict(),
        "summary": summarize(results, duration, cfg.goodput_ms, cfg.percentiles),
        "server": server,
        "requests": [r.to_dict() for r in results],
    }


def _last_turn_len(cfg: ServeBenchConfig) -> int:
    """Expected prompt tokens of a session's last turn (mean output lengths; no special tokens)."""
    return cfg.first_turn_len + (cfg.num_turns - 1) * (cfg.random_output_len + cfg.turn_input_len)


def run(cfg: ServeBenchConfig, log: Log = _stderr) -> dict[str, Any]:
    """Synchronous wrapper of ``run_async`` (for the CLI)."""
    return asyncio.run(run_async(cfg, log))
