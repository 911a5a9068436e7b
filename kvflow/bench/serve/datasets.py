"""Request streams: what each request asks for (prompt text, prompt and output lengths).

Four shapes of traffic, each seeded so every server under test gets the same requests:

* ``random``: independent prompts; lengths uniform around a mean (``range_ratio``), so there is
  no accidental prefix sharing and batching sees realistic length spread;
* ``shared-prefix``: a few groups of prompts that share a long prefix (system prompt, few-shot
  examples, a document), the case a prefix cache is for;
* ``trace``: lengths (and, in ``runner``, arrival times) of a real service's log, clipped so they
  fit a small model's context;
* ``multi-turn``: chat sessions resending their growing history each turn; its requests depend on
  the server's answers, so they are built while the run goes (``sessions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvflow.bench.serve.prompts import PromptBuilder
from kvflow.bench.serve.trace import TraceRow

DATASETS: tuple[str, ...] = ("random", "shared-prefix", "trace", "multi-turn")


@dataclass(frozen=True)
class SampleRequest:
    """One request to send: the prompt text, its token count and the output length to ask for."""

    prompt: str
    prompt_len: int
    output_len: int
    group: int | None = None  # shared-prefix group, None elsewhere
    # Chat endpoint: the whole conversation as (role, content) pairs, the last one ``prompt``'s
    # user turn; None sends ``prompt`` as a single user message.
    messages: tuple[tuple[str, str], ...] | None = None


def sample_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` integer lengths uniform on ``[mean*(1-r), mean*(1+r)]`` (at least 1); r=0 gives ``mean``."""
    if mean < 1:
        raise ValueError(f"length must be >= 1, got {mean}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def random_requests(
    builder: PromptBuilder,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
) -> list[SampleRequest]:
    """Independent random prompts of ``input_len`` tokens asking for ``output_len`` (± ratio)."""
    ins = sample_lengths(input_len, range_ratio, num_prompts, rng)
    outs = sample_lengths(output_len, range_ratio, num_prompts, rng)
    requests = []
    for n_in, n_out in zip(ins, outs):
        p = builder.build(int(n_in))
        requests.append(SampleRequest(p.text, p.num_tokens, int(n_out)))
    return requests


def shared_prefix_requests(
    builder: PromptBuilder,
    num_prompts: int,
    prefix_len: int,
    num_groups: int,
    suffix_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
) -> list[SampleRequest]:
    """Prompts in ``num_groups`` groups: a group's ``prefix_len``-token prefix, then a random suffix.

    Groups get equal shares (round-robin) and the list is shuffled, so requests of one group are
    spread over the run rather than arriving back to back.
    """
    if num_groups < 1:
        raise ValueError(f"num prefix groups must be >= 1, got {num_groups}")
    if prefix_len < 1:
        raise ValueError(f"shared prefix length must be >= 1, got {prefix_len}")
    prefixes = [builder.build(prefix_len) for _ in range(num_groups)]
    suffixes = sample_lengths(suffix_len, range_ratio, num_prompts, rng)
    outs = sample_lengths(output_len, range_ratio, num_prompts, rng)
    requests = []
    for i, (n_suffix, n_out) in enumerate(zip(suffixes, outs)):
        g = i % num_groups
        pre = prefixes[g]
        p = builder.build(pre.num_tokens + int(n_suffix), prefix=pre.words)
        requests.append(SampleRequest(p.text, p.num_tokens, int(n_out), group=g))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def trace_requests(
    builder: PromptBuilder,
    rows: list[TraceRow],
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> list[SampleRequest]:
    """One request per trace row with its context / generated lengths, clipped to [1, max]."""
    requests = []
    for row in rows:
        n_in = max(1, row.context_tokens if max_input_len is None else min(row.context_tokens, max_input_len))
        n_out = max(1, row.generated_tokens if max_output_len is None else min(row.generated_tokens, max_output_len))
        p = builder.build(n_in)
        requests.append(SampleRequest(p.text, p.num_tokens, n_out))
    return requests
