"""The ``multi-turn`` dataset: chat sessions that resend their growing history every turn.

This is the traffic a KV offload tier (host / SSD KV cache behind the prefix cache) is for: a
session's next turn arrives after its answer, with the whole conversation as its prefix, and many
sessions in flight push each other's KV out of GPU memory in between.

What is fixed by the seed (so every server gets the same sessions): each session's first prompt
(a system prompt + document of ``first_turn_len`` tokens), the new user words of every later turn
and every turn's output length. What is not: the answers, which are the server's; turn ``k+1``
resends turn ``k``'s prompt + the answer + a space + the new user words (as alternating user /
assistant messages on the chat endpoint). With greedy decoding and ``ignore_eos``, one model
answers the same on every server, so the prompts agree too.

Each session holds one ``--max-concurrency`` slot from its first turn to its last, and sends a
turn only after the previous one's stream has ended (and, with ``--think-time``, after the user's
think time: many sessions then stay open while few requests run, as in a chat service, so the
server's KV cache sees far more conversations than it runs); sessions run concurrently. A failed turn
ends its session: its later turns are recorded as failed ("not sent"), so every run has
``num_sessions * num_turns`` records and a failure counts against goodput as a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np

from kvflow.bench.serve.client import RequestResult, Target, send_request
from kvflow.bench.serve.datasets import SampleRequest, sample_lengths
from kvflow.bench.serve.prompts import Prompt, PromptBuilder


@dataclass(frozen=True)
class SessionPlan:
    """What one session will say: its first prompt, later user turns and every output length."""

    index: int
    first: Prompt
    user_turns: tuple[Prompt, ...]  # new user words of turns 2..T
    output_lens: tuple[int, ...]  # max_tokens of turns 1..T
    think_s: tuple[float, ...] = ()  # seconds the user takes before turns 2..T (none: at once)

    @property
    def num_turns(self) -> int:
        """Turns in the session (T)."""
        return len(self.output_lens)

    def first_request(self) -> SampleRequest:
        """Turn 1: the first prompt alone."""
        return SampleRequest(
            self.first.text, self.first.num_tokens, self.output_lens[0],
            messages=(("user", self.first.text),),
        )


def build_sessions(
    builder: PromptBuilder,
    num_sessions: int,
    num_turns: int,
    first_turn_len: int,
    turn_input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
) -> list[SessionPlan]:
    """``num_sessions`` seeded sessions of ``num_turns`` turns (output lengths ``output_len`` ± ratio)."""
    for name, value in (("num_sessions", num_sessions), ("num_turns", num_turns),
                        ("first_turn_len", first_turn_len), ("turn_input_len", turn_input_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    outs = sample_lengths(output_len, range_ratio, num_sessions * num_turns, rng).reshape(num_sessions, num_turns)
    plans = []
    for s in range(num_sessions):
        first = builder.build(first_turn_len)
        users = tuple(builder.continuation(turn_input_len) for _ in range(num_turns - 1))
        plans.append(SessionPlan(s, first, users, tuple(int(n) for n in outs[s])))
    return plans


def add_think_times(plans: list[SessionPlan], mean_s: float, rng: np.random.Generator) -> list[SessionPlan]:
    """Give every later turn a user's think time: exponential with mean ``mean_s`` (0: none), from its
    own seeded stream, so the prompts are the same with and without think time."""
    if mean_s < 0:
        raise ValueError(f"think time must be >= 0 s, got {mean_s}")
    if mean_s == 0:
        return plans
    return [dataclasses.replace(p, think_s=tuple(float(t) for t in rng.exponential(mean_s, p.num_turns - 1)))
            for p in plans]


def next_turn(plan: SessionPlan, prev: SampleRequest, answer: str, answer_tokens: int, turn: int) -> SampleRequest:
    """Turn ``turn`` (2..T) after ``prev`` was answered with ``answer`` (``answer_tokens`` long).

    Completions: ``prev.prompt + answer + " " + user words``. Chat: ``prev``'s messages, then the
    answer as the assistant's and the user words as the user's. ``prompt_len`` is the client's
    estimate (previous prompt + answer tokens + user tokens, special tokens excluded); the
    server's exact count comes back as ``prompt_tokens``. Counting with the tokenizer here would
    block the event loop while other sessions' tokens are being timed.
    """
    if not 2 <= turn <= plan.num_turns:
        raise ValueError(f"turn must be in [2, {plan.num_turns}], got {turn}")
    user = plan.user_turns[turn - 2]
    history = prev.messages or (("user", prev.prompt),)
    return SampleRequest(
        prompt=prev.prompt + answer + " " + user.text,
        prompt_len=prev.prompt_len + answer_tokens + user.num_tokens,
        output_len=plan.output_lens[turn - 1],
        messages=(*history, ("assistant", answer), ("user", user.text)),
    )


async def run_session(
    http: aiohttp.ClientSession,
    target: Target,
    plan: SessionPlan,
    t0: float,
    arrival_s: float,
    on_done: Callable[[int], object] = lambda n: None,
) -> list[RequestResult]:
    """Send a session's turns one after another; one record per turn, failed ones included.

    A turn's ``arrival_s`` is when it became ready (the session's start for turn 1, the previous
    answer's end after that); ``start_s`` when it was sent. Offsets are from ``t0``.
    """
    results: list[RequestResult] = []
    req = plan.first_request()
    ready = arrival_s
    for turn in range(1, plan.num_turns + 1):
        start = time.perf_counter() - t0
        result = await send_request(http, target, req)
        result.session, result.turn = plan.index, turn
        result.arrival_s, result.start_s = ready, start
        results.append(result)
        on_done(1)
        ready = time.perf_counter() - t0
        if not result.success:
            break
        if turn < plan.num_turns:
            req = next_turn(plan, req, result.generated_text, result.output_tokens, turn + 1)
            if plan.think_s:  # the user reads and types; the next turn arrives when it is sent
                await asyncio.sleep(plan.think_s[turn - 1])
                ready = time.perf_counter() - t0
    failed = len(results)
    for turn in range(failed + 1, plan.num_turns + 1):
        results.append(RequestResult(
            prompt_len=0, output_len=plan.output_lens[turn - 1], session=plan.index, turn=turn,
            error=f"not sent: turn {failed} of the session failed", arrival_s=ready, start_s=ready,
        ))
        on_done(1)
    return results


async def send_sessions(
    http: aiohttp.ClientSession,
    target: Target,
    plans: Sequence[SessionPlan],
    offsets: np.ndarray,
    max_concurrency: int | None,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Start each session at its offset (at most ``max_concurrency`` sessions alive at once).

    Returns every turn's record, session by session in turn order, and the run's duration: from
    the first session's start to the last answer.
    """
    from tqdm.auto import tqdm

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=sum(p.num_turns for p in plans), disable=not progress, desc="turns", unit="req")
    t0 = time.perf_counter()

    async def one(plan: SessionPlan, offset: float) -> list[RequestResult]:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots if slots is not None else contextlib.nullcontext():
            return await run_session(http, target, plan, t0, offset, bar.update)

    try:
        per_session = await asyncio.gather(*(one(p, float(o)) for p, o in zip(plans, offsets)))
    finally:
        bar.close()
    return [r for results in per_session for r in results], time.perf_counter() - t0
