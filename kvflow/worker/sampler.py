"""Vectorised token sampler run once per engine step.

Pipeline, applied to a ``[B, V]`` logits tensor (one row per sequence that
needs a token this step):

1. ``raw = log_softmax(logits.float())``: returned logprobs are the *raw*
   model distribution (vLLM's default), unaffected by penalties/temperature.
   Only computed when a row asked for logprobs: over a large vocabulary it is
   a few milliseconds per step that a plain greedy batch does not need.
2. Blocked ids (EOS / stop ids while a row is under ``min_tokens``) -> ``-inf``.
3. Repetition penalty (HF semantics) over tokens seen in prompt + output:
   ``logit > 0 ? logit / p : logit * p``.
4. Frequency / presence penalties (OpenAI semantics) over output tokens only:
   ``logit -= frequency * count + presence * (count > 0)``.
5. Greedy rows (temperature < SAMPLING_EPS or top_k == 1) take the argmax of
   the penalised logits.
6. Other rows: divide by temperature -> top-k -> top-p -> min-p -> sample via
   the exponential race ``argmax(probs / q), q ~ Exp(1)`` (equivalent to
   sampling from ``probs``).  Rows with their own ``torch.Generator`` (seeded
   requests) draw their ``q`` from it, so their tokens do not depend on which
   other requests share the batch; all other rows share one batched draw.

Each stage is skipped entirely when no row needs it, since this runs on every
decode step.  There are no Python loops over the vocabulary; the only per-row
Python work is the per-generator draw and flattening the ragged id lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F

from kvflow.sampling_params import SAMPLING_EPS, SamplingParams

# How many of the most likely tokens top-p inspects before falling back to a
# full-vocabulary sort.  Typical nuclei are far smaller; topk(1024) is ~15x
# cheaper than sorting a 128k vocabulary on CPU.
TOP_P_CANDIDATES: int = 1024

__all__ = [
    "TOP_P_CANDIDATES",
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "advance_generator",
    "apply_blocked_tokens",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k_top_p",
    "exponential_race",
    "penalised_logits",
    "random_row_probs",
    "token_counts",
]


@dataclass
class SamplingBatch:
    """Sampling state for the B rows of one engine step, as tensors.

    Built once per step (``from_params``).  The ``any_*`` / ``all_greedy``
    flags are derived in ``__post_init__`` so the sampler can skip stages
    without re-inspecting the tensors; top-k/top-p/min-p flags only consider
    non-greedy rows because greedy rows never reach those stages.
    """

    temperature: torch.Tensor  # [B] float32, < SAMPLING_EPS => greedy row
    top_k: torch.Tensor  # [B] int64, 0 => disabled
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    generators: list[torch.Generator | None]  # per row; owned by the request across steps
    output_token_ids: list[list[int]]  # generated so far, per row
    prompt_token_ids: list[list[int]]  # prompt, per row (repetition penalty only)
    blocked_token_ids: list[list[int]]  # forbidden this step, per row
    max_num_logprobs: int = 0  # K = max requested top logprobs; 0 = none
    any_logprobs: bool = True  # a row wants its token's logprob (from_params: params.logprobs set)

    greedy_mask: torch.Tensor = field(init=False)  # [B] bool
    random_rows: torch.Tensor = field(init=False)  # [R] int64 indices of non-greedy rows
    all_greedy: bool = field(init=False)
    any_greedy: bool = field(init=False)
    any_temperature: bool = field(init=False)  # a non-greedy row with temperature != 1
    any_top_k: bool = field(init=False)
    any_top_p: bool = field(init=False)
    any_min_p: bool = field(init=False)
    any_repetition_penalty: bool = field(init=False)
    any_additive_penalty: bool = field(init=False)  # frequency or presence
    any_penalty: bool = field(init=False)
    any_blocked: bool = field(init=False)

    def __post_init__(self) -> None:
        """Check shapes and derive the skip flags."""
        b = self.batch_size
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            t = getattr(self, name)
            if t.shape != (b,):
                raise ValueError(f"{name} must have shape ({b},), got {tuple(t.shape)}")
        for name in ("generators", "output_token_ids", "prompt_token_ids", "blocked_token_ids"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"{name} must have {b} entries, got {len(getattr(self, name))}")
        if self.max_num_logprobs < 0:
            raise ValueError(f"max_num_logprobs must be >= 0, got {self.max_num_logprobs}")
        if self.max_num_logprobs > 0 and not self.any_logprobs:
            raise ValueError("max_num_logprobs > 0 needs any_logprobs")

        # The tensor form of `SamplingParams.greedy`: rows that take the argmax, never touching a generator.
        self.greedy_mask = (self.temperature < SAMPLING_EPS) | (self.top_k == 1)
        random_mask = ~self.greedy_mask
        self.random_rows = random_mask.nonzero().squeeze(1)
        self.any_greedy = bool(self.greedy_mask.any())
        self.all_greedy = bool(self.greedy_mask.all())
        self.any_temperature = bool((random_mask & (self.temperature != 1.0)).any())
        self.any_top_k = bool((random_mask & (self.top_k > 0)).any())
        self.any_top_p = bool((random_mask & (self.top_p < 1.0)).any())
        self.any_min_p = bool((random_mask & (self.min_p > 0.0)).any())
        self.any_repetition_penalty = bool((self.repetition_penalty != 1.0).any())
        self.any_additive_penalty = bool(
            ((self.frequency_penalty != 0.0) | (self.presence_penalty != 0.0)).any()
        )
        self.any_penalty = self.any_repetition_penalty or self.any_additive_penalty
        self.any_blocked = any(len(ids) > 0 for ids in self.blocked_token_ids)

    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return int(self.temperature.shape[0])

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        output_token_ids: Sequence[list[int]] | None = None,
        prompt_token_ids: Sequence[list[int]] | None = None,
        blocked_token_ids: Sequence[list[int]] | None = None,
    ) -> SamplingBatch:
        """Pack per-request params and ragged token lists into one batch.

        Omitted lists default to "nothing" per row.  A seeded row must come
        with its generator: creating one here would reset it every step and
        repeat the same draw.
        """
        b = len(params)
        gens: list[torch.Generator | None] = list(generators) if generators is not None else [None] * b
        if len(gens) != b:
            raise ValueError(f"generators must have {b} entries, got {len(gens)}")
        for i, (p, g) in enumerate(zip(params, gens)):
            if p.seed is not None and g is None and not p.greedy:
                raise ValueError(
                    f"row {i} has seed={p.seed} but no generator; the request must own "
                    "a torch.Generator seeded once and reused across steps"
                )

        def rows(lists: Sequence[list[int]] | None) -> list[list[int]]:
            # Shallow: the per-row lists are only read, and copying every
            # sequence's history each step would cost O(total tokens).
            return list(lists) if lists is not None else [[] for _ in range(b)]

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32)

        return cls(
            temperature=f32([p.temperature for p in params]),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            generators=gens,
            output_token_ids=rows(output_token_ids),
            prompt_token_ids=rows(prompt_token_ids),
            blocked_token_ids=rows(blocked_token_ids),
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            any_logprobs=any(p.logprobs is not None for p in params),
        )


@dataclass
class SamplerOutput:
    """Result of one sampling step."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, raw log_softmax(logits) at token_ids; None: none asked
    top_token_ids: torch.Tensor | None  # [B, K] int64, raw top-K; None when K == 0
    top_logprobs: torch.Tensor | None  # [B, K] float32


def _flatten_rows(
    token_ids: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-row id lists -> (row index, token id) flat int64 tensors."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)
    flat = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    return rows.to(device), flat.to(device)


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[B, V]`` int64 occurrence counts of each id per row, via one bincount.

    Raises on ids outside ``[0, vocab_size)`` because those would silently
    land in a neighbouring row's counts.
    """
    b = len(token_ids)
    rows, flat = _flatten_rows(token_ids, torch.device(device))
    if flat.numel() == 0:
        return torch.zeros(b, vocab_size, dtype=torch.int64, device=device)
    if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:
        raise ValueError(
            f"token ids must be in [0, {vocab_size}), got range "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    return torch.bincount(rows * vocab_size + flat, minlength=b * vocab_size).view(b, vocab_size)


def apply_blocked_tokens(logits: torch.Tensor, blocked_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Return logits with each row's blocked ids set to ``-inf``.

    Ids outside the vocabulary are ignored: they can never be sampled anyway
    (e.g. a tokenizer id beyond a model's output head).
    """
    rows, flat = _flatten_rows(blocked_token_ids, logits.device)
    keep = (flat >= 0) & (flat < logits.shape[1])
    out = logits.clone()
    out[rows[keep], flat[keep]] = float("-inf")
    return out


def apply_penalties(
    logits: torch.Tensor,
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]],
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    repetition_penalty: torch.Tensor,
) -> torch.Tensor:
    """Apply repetition (HF, prompt+output) then frequency/presence (OpenAI, output) penalties.

    Rows whose penalties are neutral contribute no ids to the count tensors,
    so a long prompt costs nothing unless that row uses repetition_penalty.
    """
    b, v = logits.shape
    device = logits.device
    rep = repetition_penalty.to(device=device, dtype=logits.dtype)
    pres = presence_penalty.to(device=device, dtype=logits.dtype)
    freq = frequency_penalty.to(device=device, dtype=logits.dtype)
    rep_rows = (rep != 1.0).tolist()
    add_rows = ((pres != 0.0) | (freq != 0.0)).tolist()
    out_needed = [r or a for r, a in zip(rep_rows, add_rows)]

    out_counts = token_counts(
        [ids if need else [] for ids, need in zip(output_token_ids, out_needed)], v, device
    )
    x = logits
    if any(rep_rows):
        prompt_counts = token_counts(
            [ids if need else [] for ids, need in zip(prompt_token_ids, rep_rows)], v, device
        )
        seen = (out_counts + prompt_counts) > 0
        p = rep.unsqueeze(1)
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
    if any(add_rows):
        counts = out_counts.to(x.dtype)
        x = x - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0).to(x.dtype)
    return x


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    *,
    top_p_candidates: int = TOP_P_CANDIDATES,
) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus.

    top_k: [B] int, ``<= 0`` (or ``>= V``) disables.  Tokens tied with the
    k-th largest value are all kept, so the kept set is a pure function of the
    row (bf16 logits tie often).
    top_p: [B] float; keeps the smallest prefix, by descending probability of
    the top-k-renormalised distribution, whose cumulative probability reaches
    top_p.  The top token is always kept; rows with ``top_p >= 1`` are left
    untouched (a float cumsum can reach 1 early and would drop tail tokens).

    Avoids a full-vocabulary sort (the dominant cost on CPU): top-k uses one
    ``topk(max k)`` to find each row's threshold, and top-p first looks for
    the nucleus among the ``top_p_candidates`` most likely tokens, sorting the
    whole row only when the nucleus is larger.  Both choices depend only on
    the row itself, so results do not depend on the other rows of the batch.
    """
    b, v = logits.shape
    if (top_k is None and top_p is None) or b == 0:
        return logits
    out = logits
    if top_k is not None:
        k = top_k.to(device=logits.device, dtype=torch.int64)
        out = _apply_top_k(out, torch.where(k <= 0, v, k).clamp(1, v))
    if top_p is None:
        return out
    p = top_p.to(device=logits.device, dtype=logits.dtype)
    p_rows = (p < 1.0).nonzero().squeeze(1)
    if p_rows.numel() == 0:
        return out
    candidates = max(1, min(v, top_p_candidates))
    if p_rows.numel() == b:
        return _apply_top_p(out, p, candidates)
    nucleus = _apply_top_p(out[p_rows], p[p_rows], candidates)
    out = out.clone() if out is logits else out  # never write into the caller's tensor
    out[p_rows] = nucleus
    return out


def _apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask values below each row's k-th largest; ``k == V`` rows are untouched."""
    v = logits.shape[1]
    enabled = k < v
    if not bool(enabled.any()):
        return logits
    k_max = int(k[enabled].max())
    top_vals = logits.topk(k_max, dim=-1).values
    kth = top_vals.gather(1, (k.clamp(max=k_max) - 1).unsqueeze(1))
    kth = kth.masked_fill(~enabled.unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, p: torch.Tensor, candidates: int) -> torch.Tensor:
    """Keep each row's nucleus; every row here has ``p < 1``.

    Probabilities are normalised over the whole row (already top-k masked),
    so the nucleus found among the candidates is exact whenever the
    candidates' cumulative mass reaches p; other rows are redone over all V.
    """
    v = logits.shape[1]
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    vals, idx = logits.topk(candidates, dim=-1)  # sorted, descending
    probs = (vals - log_norm).exp()
    cumulative = probs.cumsum(dim=-1)
    # Exclusive cumsum: mass strictly before each token; the top token has 0 < p.
    mass_before = F.pad(cumulative[:, :-1], (1, 0))
    kept = vals.masked_fill(mass_before >= p.unsqueeze(1), float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter_(1, idx, kept)
    if candidates < v:
        short = (cumulative[:, -1] < p).nonzero().squeeze(1)
        if short.numel() > 0:
            out[short] = _apply_top_p(logits[short], p[short], v)
    return out


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose prob is below ``min_p * max prob`` of their row."""
    probs = logits.softmax(dim=-1)
    scale = min_p.to(device=logits.device, dtype=probs.dtype).unsqueeze(1)
    threshold = probs.amax(dim=-1, keepdim=True) * scale
    return logits.masked_fill(probs < threshold, float("-inf"))


def _seeded_draw(width: int, device: torch.device | str, generator: torch.Generator) -> torch.Tensor:
    """The one draw a seeded random row makes per sampled token: ``q ~ Exp(1)`` over the logits width.

    Drawn on the generator's own device (a request's generator lives on the CPU), then moved: a
    CUDA tensor cannot draw from a CPU generator, and this way a seed gives the same draws, hence
    the same tokens, whichever device runs the model."""
    return torch.empty(width, device=generator.device).exponential_(generator=generator).to(device)


def advance_generator(
    params: SamplingParams, generator: torch.Generator, num_tokens: int, vocab_size: int,
    device: torch.device | str = "cpu",
) -> None:
    """Advance a seeded request's generator past the draws made for its first ``num_tokens`` tokens.

    A disaggregated request's first token is sampled on the prefill instance; the decode instance
    holds a fresh generator with the same seed and must skip those draws, or every later token
    differs from colocated sampling.  ``vocab_size`` must be the logits width (the draw's size).
    """
    if params.greedy:  # argmax rows draw nothing
        return
    for _ in range(num_tokens):
        _seeded_draw(vocab_size, device, generator)


def exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Sample one id per row: ``argmax(probs / q)`` with ``q ~ Exp(1)``.

    Seeded rows draw their own ``q`` so the result depends only on their own
    generator and row; the rest share a single batched draw.
    """
    q = torch.empty_like(probs)
    seeded = [(i, g) for i, g in enumerate(generators) if g is not None]
    if not seeded:
        q.exponential_()
    else:
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
        for i, g in seeded:
            q[i] = _seeded_draw(probs.shape[1], probs.device, g)
    # exponential_ may return exactly 0; a masked token (prob 0) would then give
    # 0/0 = NaN, which argmax treats as the maximum.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def penalised_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stages 2-4 (blocked ids, then penalties) on float logits: what greedy rows take the argmax of.

    Shared with the rejection sampler, so a verified row is penalised exactly as a sampled one.
    """
    x = logits
    if batch.any_blocked:
        x = apply_blocked_tokens(x, batch.blocked_token_ids)
    if batch.any_penalty:
        x = apply_penalties(
            x,
            batch.output_token_ids,
            batch.prompt_token_ids,
            batch.presence_penalty,
            batch.frequency_penalty,
            batch.repetition_penalty,
        )
    return x


def random_row_probs(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stage 6 up to the draw: ``[R, V]`` probs of the ``batch.random_rows`` of penalised logits ``x``.

    Temperature -> top-k -> top-p -> min-p -> softmax; when the batch mixes greedy and random rows,
    only the random rows are gathered into these stages.  Shared with the rejection sampler, whose
    target p and draft q must both be exactly this distribution.
    """
    device = x.device
    partial = batch.any_greedy
    rows = batch.random_rows.to(device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t[rows] if partial else t

    sub = pick(x)
    if batch.any_temperature:
        sub = sub / pick(batch.temperature).unsqueeze(1)
    if batch.any_top_k or batch.any_top_p:
        sub = apply_top_k_top_p(
            sub,
            pick(batch.top_k) if batch.any_top_k else None,
            pick(batch.top_p) if batch.any_top_p else None,
        )
    if batch.any_min_p:
        sub = apply_min_p(sub, pick(batch.min_p))
    return sub.softmax(dim=-1)


class Sampler:
    """Stateless batched sampler; see the module docstring for the stage order."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Pick one token per row of ``logits`` ([B, V], any float dtype)."""
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size:
            raise ValueError(
                f"logits must have shape [{batch.batch_size}, V], got {tuple(logits.shape)}"
            )
        logits = logits.float()  # no-op for float32; upcasts bf16/fp16
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.any_logprobs else None

        x = penalised_logits(logits, batch)

        if batch.all_greedy:
            token_ids = x.argmax(dim=-1)
        else:
            token_ids = self._sample_random_rows(x, batch)

        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_ids, logprobs=None, top_token_ids=None, top_logprobs=None)
        logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        top_ids: torch.Tensor | None = None
        top_lps: torch.Tensor | None = None
        if batch.max_num_logprobs > 0:
            k = min(batch.max_num_logprobs, raw_logprobs.shape[1])
            top_lps, top_ids = raw_logprobs.topk(k, dim=-1)
        return SamplerOutput(
            token_ids=token_ids, logprobs=logprobs, top_token_ids=top_ids, top_logprobs=top_lps
        )

    @staticmethod
    def _sample_random_rows(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Greedy rows -> argmax; the rest go through temperature/truncation (``random_row_probs``) and the race."""
        device = x.device
        partial = batch.any_greedy
        rows = batch.random_rows.to(device)
        probs = random_row_probs(x, batch)
        generators = [batch.generators[i] for i in rows.tolist()] if partial else batch.generators
        sampled = exponential_race(probs, generators)
        if not partial:
            return sampled

        greedy = batch.greedy_mask.to(device)
        token_ids = torch.empty(x.shape[0], dtype=torch.int64, device=device)
        token_ids[greedy] = x[greedy].argmax(dim=-1)
        token_ids[rows] = sampled
        return token_ids
