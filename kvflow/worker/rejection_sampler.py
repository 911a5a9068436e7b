"""Rejection sampler for speculative decoding: verify K proposed tokens in one target step.

The target model scores, per request, its K_i draft tokens plus one more position; row (i, j)
holds the target's logits for request i's token after its outputs plus ``drafts[:j]``.  The
output distribution is exactly the target's (Leviathan et al. / Chen et al.):

- p = ``processed_probs`` of the target row (blocked ids, penalties, temperature, top-k, top-p,
  min-p: the same stages as ``Sampler``), q = the draft's distribution processed the same way,
  or a point mass at the proposal (n-gram prompt lookup).
- Draft x at row j is accepted with probability ``min(1, p(x) / q(x))`` (``u * q(x) <= p(x)``,
  and never when ``p(x) == 0``); at the first rejection one token is drawn from
  ``norm(max(0, p - q))`` and the step ends; when all K are accepted a bonus token is drawn from
  p at row K.  Every request therefore emits its accepted drafts plus exactly one token.
- Greedy rows accept exactly while the draft equals the argmax of the penalised target logits
  and emit that argmax; they draw nothing.
- Draws: a request with a ``torch.Generator`` (seeded) draws from it only, in a fixed order:
  K uniforms (one per draft position, all of them whatever is accepted), then one ``Exp(1)``
  race of width V for the final token, as ``Sampler`` draws for one token.  Its tokens thus depend
  only on its own rows and seed.  Unseeded requests share one batched draw of each kind.

Everything is vectorised over the rows; the Python work is per request (ragged bookkeeping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvflow.sampling_params import SamplingParams
from kvflow.worker.sampler import SamplingBatch, exponential_race, penalised_logits, random_row_probs
from kvflow.worker.step import TokenLogprobs

__all__ = ["RejectionOutput", "RejectionSampler", "VerificationBatch", "plain_greedy", "processed_probs",
           "verify_plain_greedy"]


@dataclass
class VerificationBatch:
    """One verification step: per request its draft tokens; one sampling row per verified position."""

    draft_token_ids: list[list[int]]  # per request, K_i >= 0 proposals
    sampling: SamplingBatch  # sum(K_i + 1) rows, request-major: request i's rows are positions j = 0..K_i
    num_logprobs: list[int | None]  # per request: its params.logprobs (None: no logprobs)

    def __post_init__(self) -> None:
        """Check that the rows match the drafts, since every index below is derived from them."""
        if len(self.num_logprobs) != len(self.draft_token_ids):
            raise ValueError(
                f"num_logprobs must have {len(self.draft_token_ids)} entries, got {len(self.num_logprobs)}"
            )
        rows = sum(len(d) + 1 for d in self.draft_token_ids)
        if self.sampling.batch_size != rows:
            raise ValueError(f"sampling must have sum(K_i + 1) = {rows} rows, got {self.sampling.batch_size}")

    @property
    def num_requests(self) -> int:
        """Number of requests B."""
        return len(self.draft_token_ids)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        output_token_ids: Sequence[list[int]],
        prompt_token_ids: Sequence[list[int]],
        draft_token_ids: Sequence[list[int]],
        eos_token_ids: Sequence[Sequence[int]],
    ) -> VerificationBatch:
        """Row (i, j) samples request i's token after its outputs plus drafts[:j]: its penalties count
        output_token_ids[i] + draft_token_ids[i][:j], and EOS / stop ids are blocked while
        len(output_token_ids[i]) + j < params.min_tokens (as Request.blocked_token_ids does for j = 0).

        A row's history is only copied when its request has a penalty that reads it; otherwise the
        row shares the request's own list, which the sampler then never reads (as from_params does).
        """
        b = len(params)
        for name, seq in (
            ("generators", generators),
            ("output_token_ids", output_token_ids),
            ("prompt_token_ids", prompt_token_ids),
            ("draft_token_ids", draft_token_ids),
            ("eos_token_ids", eos_token_ids),
        ):
            if len(seq) != b:
                raise ValueError(f"{name} must have {b} entries, got {len(seq)}")
        rows = [(i, j) for i, drafts in enumerate(draft_token_ids) for j in range(len(drafts) + 1)]
        sampling = position_rows(params, generators, output_token_ids, prompt_token_ids, draft_token_ids,
                                 eos_token_ids, rows)
        return cls(
            draft_token_ids=[list(d) for d in draft_token_ids],
            sampling=sampling,
            num_logprobs=[p.logprobs for p in params],
        )


def position_rows(
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    output_token_ids: Sequence[list[int]],
    prompt_token_ids: Sequence[list[int]],
    draft_token_ids: Sequence[list[int]],
    eos_token_ids: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, int]],
) -> SamplingBatch:
    """One sampling row per (request i, position j): the token after request i's outputs plus
    drafts[:j] (`VerificationBatch.build`'s rows; a draft model samples its proposal j from the same
    row, so p and q are processed alike)."""
    row_params: list[SamplingParams] = []
    row_outputs: list[list[int]] = []
    row_blocked: list[list[int]] = []
    for i, j in rows:
        p, out, drafts = params[i], output_token_ids[i], draft_token_ids[i]
        penalised = p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        stop_ids = ([] if p.ignore_eos else list(eos_token_ids[i])) + list(p.stop_token_ids)
        row_params.append(p)
        row_outputs.append(out + list(drafts[:j]) if penalised and j > 0 else out)
        row_blocked.append(stop_ids if len(out) + j < p.min_tokens else [])
    return SamplingBatch.from_params(
        row_params,
        generators=[generators[i] for i, _ in rows],
        output_token_ids=row_outputs,
        prompt_token_ids=[prompt_token_ids[i] for i, _ in rows],
        blocked_token_ids=row_blocked,
    )


def _probs_of_penalised(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """``processed_probs`` from already penalised float logits."""
    greedy = batch.greedy_mask.to(x.device)
    probs = torch.zeros_like(x)
    if batch.any_greedy:
        g_rows = greedy.nonzero().squeeze(1)
        probs[g_rows, x[g_rows].argmax(dim=-1)] = 1.0
    if not batch.all_greedy:
        probs[batch.random_rows.to(x.device)] = random_row_probs(x, batch)
    return probs


def processed_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[N, V] fp32: the distribution each row samples from after blocked ids, penalties, temperature,
    top-k, top-p and min-p (greedy rows: one-hot at the argmax). What p is, and what a draft model's q
    must be computed with (the same stages, so p and q are processed consistently)."""
    if logits.dim() != 2 or logits.shape[0] != batch.batch_size:
        raise ValueError(f"logits must have shape [{batch.batch_size}, V], got {tuple(logits.shape)}")
    return _probs_of_penalised(penalised_logits(logits.float(), batch), batch)


def plain_greedy(params: SamplingParams, num_outputs: int) -> bool:
    """Greedy, no penalties, and no EOS/stop blocking from here on (`num_outputs` >= min_tokens): every
    position's processed logits are the raw ones, so its token is their argmax."""
    return (params.greedy and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0 and num_outputs >= params.min_tokens)


def verify_plain_greedy(target_logits: torch.Tensor, draft_token_ids: Sequence[list[int]]) -> list[list[int]]:
    """What `RejectionSampler` emits for requests that are all `plain_greedy` (rows as in
    `VerificationBatch`): the proposals while each equals the argmax of its row, then the argmax at the
    first mismatch (or the bonus row). The same argmaxes, without building the sampling rows, the
    penalty and probability stages they would skip, or the per-row tensors of the general path."""
    best = target_logits.argmax(dim=-1).tolist()
    tokens: list[list[int]] = []
    start = 0
    for drafts in draft_token_ids:
        a = 0
        while a < len(drafts) and drafts[a] == best[start + a]:
            a += 1
        tokens.append(list(drafts[:a]) + [best[start + a]])
        start += len(drafts) + 1
    if start != target_logits.shape[0]:
        raise ValueError(f"target_logits must have sum(K_i + 1) = {start} rows, got {target_logits.shape[0]}")
    return tokens


@dataclass
class RejectionOutput:
    """Result of one verification step, per request."""

    token_ids: list[list[int]]  # accepted drafts, then exactly one more token (correction or bonus)
    num_accepted: list[int]  # drafts accepted (0..K_i)
    logprobs: list[list[TokenLogprobs] | None]  # per emitted token: raw target logprobs; None if not asked


def _uniforms(
    draft_counts: list[int], generators: list[torch.Generator | None], draws: list[bool], device: torch.device
) -> torch.Tensor:
    """One U[0, 1) per draft position of the requests with ``draws`` set (others get 0, unused).

    A seeded request draws its K_i uniforms from its own generator (on the generator's device, then
    moved, as ``Sampler`` does, so a seed gives the same tokens on any device); the rest share one draw.
    """
    u = torch.zeros(sum(draft_counts), device=device)
    unseeded: list[int] = []
    start = 0
    for k, g, draw in zip(draft_counts, generators, draws):
        if draw and k > 0:
            if g is None:
                unseeded.extend(range(start, start + k))
            else:
                u[start : start + k] = torch.rand(k, generator=g, device=g.device).to(device)
        start += k
    if unseeded:
        u[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), device=device)
    return u


class RejectionSampler:
    """Stateless batched verifier; see the module docstring for the algorithm and the draw order."""

    def __call__(
        self, target_logits: torch.Tensor, batch: VerificationBatch, draft_probs: torch.Tensor | None = None
    ) -> RejectionOutput:
        """target_logits [sum(K_i + 1), V] (rows as batch.sampling). draft_probs [sum(K_i), V]: the
        draft model's processed q for each proposal (request-major), or None for point-mass proposals
        (n-gram prompt lookup: q = one-hot at the proposal, so accept with probability p(x) and on
        rejection resample from p with x removed, renormalised)."""
        sampling = batch.sampling
        n = sampling.batch_size
        if target_logits.dim() != 2 or target_logits.shape[0] != n:
            raise ValueError(f"target_logits must have shape [{n}, V], got {tuple(target_logits.shape)}")
        device = target_logits.device
        v = target_logits.shape[1]
        counts = [len(d) for d in batch.draft_token_ids]
        m = sum(counts)
        if draft_probs is not None and tuple(draft_probs.shape) != (m, v):
            raise ValueError(f"draft_probs must have shape [{m}, {v}], got {tuple(draft_probs.shape)}")
        drafts = torch.tensor([t for d in batch.draft_token_ids for t in d], dtype=torch.int64)
        if m > 0 and (int(drafts.min()) < 0 or int(drafts.max()) >= v):
            raise ValueError(f"draft token ids must be in [0, {v})")
        drafts = drafts.to(device)

        # Row layout: request i's rows start at row_start[i]; its drafts at draft_start[i].
        row_start = [0] * len(counts)
        draft_start = [0] * len(counts)
        for i in range(1, len(counts)):
            row_start[i] = row_start[i - 1] + counts[i - 1] + 1
            draft_start[i] = draft_start[i - 1] + counts[i - 1]
        target_rows = torch.tensor(
            [row_start[i] + j for i, k in enumerate(counts) for j in range(k)], dtype=torch.int64, device=device
        )
        greedy_rows = sampling.greedy_mask.tolist()
        greedy = [greedy_rows[s] for s in row_start]
        generators = [sampling.generators[s] for s in row_start]

        logits = target_logits.float()
        x = penalised_logits(logits, sampling)
        p = _probs_of_penalised(x, sampling)

        # Accept/reject every draft at once; a request keeps its leading run of acceptances.
        p_x = p[target_rows, drafts]
        if draft_probs is None:
            q_x = torch.ones_like(p_x)
        else:
            q_x = draft_probs.to(device=device, dtype=torch.float32)[torch.arange(m, device=device), drafts]
        u = _uniforms(counts, generators, [not g for g in greedy], device)
        accept_random = (u * q_x <= p_x) & (p_x > 0)
        accept_greedy = x[target_rows].argmax(dim=-1) == drafts
        row_greedy = torch.tensor([g for g, k in zip(greedy, counts) for _ in range(k)], dtype=torch.bool)
        accepted = torch.where(row_greedy.to(device), accept_greedy, accept_random).tolist()
        num_accepted: list[int] = []
        for k, s in zip(counts, draft_start):
            a = 0
            while a < k and accepted[s + a]:
                a += 1
            num_accepted.append(a)

        # The final token: greedy requests take the argmax at their stop row; random ones race once
        # over p at the stop row, minus q there when a draft was rejected.
        final = [0] * len(counts)
        stop_rows = [s + a for s, a in zip(row_start, num_accepted)]
        g_idx = [i for i, g in enumerate(greedy) if g]
        if g_idx:
            picked = x[torch.tensor([stop_rows[i] for i in g_idx], device=device)].argmax(dim=-1).tolist()
            for i, t in zip(g_idx, picked):
                final[i] = t
        r_idx = [i for i, g in enumerate(greedy) if not g]
        if r_idx:
            dist = p[torch.tensor([stop_rows[i] for i in r_idx], device=device)]
            rej = [(r, i) for r, i in enumerate(r_idx) if num_accepted[i] < counts[i]]
            if rej:
                rr = torch.tensor([r for r, _ in rej], device=device)
                rejected_drafts = torch.tensor([draft_start[i] + num_accepted[i] for _, i in rej], device=device)
                if draft_probs is None:
                    q = torch.zeros(len(rej), v, device=device)
                    q[torch.arange(len(rej), device=device), drafts[rejected_drafts]] = 1.0
                else:
                    q = draft_probs.to(device=device, dtype=torch.float32)[rejected_drafts]
                residual = (dist[rr] - q).clamp_min_(0.0)
                # p <= q everywhere can only come from rounding (the rejection had probability ~0): use p.
                empty = residual.sum(dim=-1, keepdim=True) <= 0
                dist[rr] = torch.where(empty, dist[rr], residual)
            picked = exponential_race(dist, [generators[i] for i in r_idx]).tolist()
            for i, t in zip(r_idx, picked):
                final[i] = t

        token_ids = [batch.draft_token_ids[i][: num_accepted[i]] + [final[i]] for i in range(len(counts))]
        return RejectionOutput(
            token_ids=token_ids,
            num_accepted=num_accepted,
            logprobs=self._logprobs(logits, batch, row_start, token_ids),
        )

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, batch: VerificationBatch, row_start: list[int], token_ids: list[list[int]]
    ) -> list[list[TokenLogprobs] | None]:
        """Raw target log_softmax at each emitted token's row, over only the rows whose request asked."""
        asked = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
        out: list[list[TokenLogprobs] | None] = [None] * batch.num_requests
        if not asked:
            return out
        rows = [row_start[i] + j for i in asked for j in range(len(token_ids[i]))]
        chosen_ids = [t for i in asked for t in token_ids[i]]
        raw = torch.log_softmax(logits[torch.tensor(rows, device=logits.device)], dim=-1)
        chosen = raw.gather(1, torch.tensor(chosen_ids, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
        k_max = min(max(batch.num_logprobs[i] or 0 for i in asked), raw.shape[1])
        top_lps, top_ids = raw.topk(k_max, dim=-1) if k_max else (None, None)
        top_lps_l = top_lps.tolist() if top_lps is not None else None
        top_ids_l = top_ids.tolist() if top_ids is not None else None
        r = 0
        for i in asked:
            k = batch.num_logprobs[i] or 0
            entries: list[TokenLogprobs] = []
            for t in token_ids[i]:
                entries.append(TokenLogprobs(
                    t, chosen[r],
                    top_ids_l[r][:k] if k and top_ids_l else [], top_lps_l[r][:k] if k and top_lps_l else [],
                ))
                r += 1
            out[i] = entries
        return out
