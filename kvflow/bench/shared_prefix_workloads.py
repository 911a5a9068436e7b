"""Shared-prefix workloads of ``kvflow bench throughput``: batches whose prompts share prefixes by
groups, scattered through the batch, for prefix caching and prefix-tree batching (BatchLLM).

- ``fewshot``: G groups x R requests; a group's requests share a P-token prefix (its few-shot
  examples), then each has S tokens of its own; outputs uniform in [64, 512] tokens.
- ``docqa``: G documents x R questions; document lengths uniform in [P/2, 2P] (512-2048 at the
  default P = 1024), question lengths in [S/2, 2S] (16-64), outputs in [32, 256].
- ``noshare``: fewshot's lengths (P + S prompt tokens, the same outputs) with nothing shared: the
  case prefix-aware scheduling must not slow down.

The issue's full size is G = 64, R = 16, P = 1024, S = 32 (fewshot, noshare: 1,024 requests,
~1.1M prompt and ~295k output tokens) and 16 x 32 for docqa: hours on a 2-core CPU. Every size is
an option (``SharedPrefixSizes``): counts directly, token lengths directly or by ``length_scale``
(which multiplies the defaults of the lengths not given).

Token ids are seeded random, as for ``offline``: the same for every backend. Within a group the
requests' own parts start with distinct tokens and groups' prefixes start with distinct tokens, so
a group shares exactly its prefix (no accidental longer common prefix). The batch is shuffled
(seeded) uniformly, so group members are only as adjacent as chance makes them, as in a real
batch: the engine has to find the groups. Each request has its own ``max_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SHARED_PREFIX_WORKLOADS: tuple[str, ...] = ("fewshot", "docqa", "noshare")

#: Each workload's defaults: groups, requests per group, P, S, output min and max.
DEFAULTS: dict[str, tuple[int, int, int, int, int, int]] = {
    "fewshot": (64, 16, 1024, 32, 64, 512),
    "docqa": (16, 32, 1024, 32, 32, 256),
    "noshare": (64, 16, 1024, 32, 64, 512),
}


@dataclass(frozen=True)
class SharedPrefixSizes:
    """Overrides of a workload's sizes; None keeps the default (scaled by ``length_scale``)."""

    groups: int | None = None
    group_requests: int | None = None
    shared_tokens: int | None = None  # P (docqa: the middle of the document lengths [P/2, 2P])
    suffix_tokens: int | None = None  # S (docqa: questions in [S/2, 2S])
    output_min: int | None = None
    output_max: int | None = None
    length_scale: float = 1.0

    def resolve(self, workload: str) -> ResolvedSizes:
        """The sizes ``workload`` runs with, checked."""
        if workload not in DEFAULTS:
            raise ValueError(f"unknown shared-prefix workload {workload!r}; expected one of {SHARED_PREFIX_WORKLOADS}")
        if self.length_scale <= 0:
            raise ValueError(f"length_scale must be positive, got {self.length_scale}")
        g, r, p, s, lo, hi = DEFAULTS[workload]

        def scaled(value: int | None, default: int) -> int:
            return value if value is not None else max(1, round(default * self.length_scale))

        out = ResolvedSizes(
            groups=self.groups if self.groups is not None else g,
            group_requests=self.group_requests if self.group_requests is not None else r,
            shared_tokens=scaled(self.shared_tokens, p),
            suffix_tokens=scaled(self.suffix_tokens, s),
            output_min=scaled(self.output_min, lo),
            output_max=scaled(self.output_max, hi),
        )
        if self.output_min is None and self.output_max is not None:  # one bound given: the other follows
            out = replace(out, output_min=min(out.output_min, out.output_max))
        if self.output_max is None and self.output_min is not None:
            out = replace(out, output_max=max(out.output_min, out.output_max))
        if min(out.groups, out.group_requests, out.shared_tokens, out.suffix_tokens, out.output_min) < 1:
            raise ValueError(f"every size must be positive, got {out}")
        if out.output_min > out.output_max:
            raise ValueError(f"output_min {out.output_min} > output_max {out.output_max}")
        return out


@dataclass(frozen=True)
class ResolvedSizes:
    groups: int
    group_requests: int
    shared_tokens: int
    suffix_tokens: int
    output_min: int
    output_max: int

    @property
    def num_requests(self) -> int:
        return self.groups * self.group_requests


@dataclass
class SharedPrefixBatch:
    """One batch of a workload, in its shuffled order."""

    prompts: list[list[int]]
    max_tokens: list[int]
    group: list[int]  # each request's group (noshare: every request its own)
    shared_len: list[int]  # tokens each request shares with its group by construction (noshare: 0)


def _distinct_firsts(rng: np.random.Generator, count: int, low: int, high: int) -> np.ndarray:
    """``count`` distinct token ids in [low, high): the first tokens of parts that must differ."""
    if count > high - low:
        raise ValueError(f"{count} parts need distinct first tokens but the vocabulary has only "
                         f"{high - low} usable ids: use fewer groups/requests or a larger vocabulary")
    return rng.choice(np.arange(low, high), size=count, replace=False)


def make_batch(workload: str, sizes: ResolvedSizes | SharedPrefixSizes, vocab_size: int, seed: int = 0,
               stream: int = 0) -> SharedPrefixBatch:
    """The seeded batch of ``workload``; ids in [100, vocab_size - 100) as ``make_prompts``'s.

    ``stream`` picks an independent batch of the same seed (another repeat, the warm-up)."""
    if isinstance(sizes, SharedPrefixSizes):
        sizes = sizes.resolve(workload)
    if vocab_size <= 200:
        raise ValueError(f"vocab_size {vocab_size} too small for ids in [100, vocab_size - 100)")
    low, high = 100, vocab_size - 100
    rng = np.random.default_rng([seed, stream, SHARED_PREFIX_WORKLOADS.index(workload)])
    g, r, p, s = sizes.groups, sizes.group_requests, sizes.shared_tokens, sizes.suffix_tokens
    n = g * r

    def rand(length: int, first: int) -> list[int]:
        ids = rng.integers(low, high, size=length, dtype=np.int64)
        ids[0] = first
        return ids.tolist()

    if workload == "docqa":
        shared = rng.integers(max(1, p // 2), 2 * p + 1, size=g)
        own = rng.integers(max(1, s // 2), 2 * s + 1, size=n)
    else:
        shared = np.full(g, p)
        own = np.full(n, s)
    prompts, group, shared_len = [], [], []
    if workload == "noshare":
        firsts = _distinct_firsts(rng, n, low, high)
        for i in range(n):
            prompts.append(rand(p + s, int(firsts[i])))
            group.append(i)
            shared_len.append(0)
    else:
        group_firsts = _distinct_firsts(rng, g, low, high)
        for gi in range(g):
            prefix = rand(int(shared[gi]), int(group_firsts[gi]))
            own_firsts = _distinct_firsts(rng, r, low, high)
            for j in range(r):
                prompts.append(prefix + rand(int(own[gi * r + j]), int(own_firsts[j])))
                group.append(gi)
                shared_len.append(len(prefix))
    max_tokens = rng.integers(sizes.output_min, sizes.output_max + 1, size=n).tolist()
    order = rng.permutation(n).tolist()
    return SharedPrefixBatch(
        prompts=[prompts[i] for i in order],
        max_tokens=[int(max_tokens[i]) for i in order],
        group=[group[i] for i in order],
        shared_len=[shared_len[i] for i in order],
    )
