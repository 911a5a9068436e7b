"""Tests for the speculative-decoding rejection sampler.

The distribution tests draw proposals from a deliberately different q, verify them with many
independent requests in one call, and chi-square the emitted tokens against an independent
float64 reference of the target's processed distribution p (and show that q is rejected).  Greedy,
K = 0 and logprob behaviour are checked against the plain ``Sampler`` / ``log_softmax`` run row by
row.  The torch RNG is seeded in each test, so the statistical tests are deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from kvflow.sampling_params import SamplingParams
from kvflow.worker.rejection_sampler import RejectionSampler, VerificationBatch, processed_probs
from kvflow.worker.sampler import Sampler, SamplingBatch

V = 8
NUM_TRIALS = 12_000


def reference_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> np.ndarray:
    """Naive float64 softmax(l / T) -> top-k -> top-p -> min-p, renormalised after each stage."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    if top_k > 0:
        probs[order[top_k:]] = 0.0
        probs /= probs.sum()
    if top_p < 1.0:
        cumulative = np.cumsum(probs[order])
        assert np.all(np.abs(cumulative - top_p) > 1e-4), "too close to a top-p boundary"
        cut = int(np.searchsorted(cumulative, top_p)) + 1  # smallest prefix reaching top_p
        probs[order[cut:]] = 0.0
        probs /= probs.sum()
    if min_p > 0.0:
        threshold = min_p * probs.max()
        assert np.all(np.abs(probs - threshold) > 1e-6), "too close to a min-p boundary"
        probs[probs < threshold] = 0.0
        probs /= probs.sum()
    return probs


def chi2_pvalue(samples: list[int], expected: np.ndarray) -> float:
    """Goodness-of-fit p-value (bins with expected count < 5 pooled); tokens outside the support fail."""
    n = len(samples)
    counts = np.bincount(np.asarray(samples, dtype=np.int64), minlength=expected.shape[0]).astype(np.float64)
    leaked = np.nonzero(counts * (expected == 0.0))[0]
    assert leaked.size == 0, f"sampled tokens outside the support: {leaked}"
    support = expected > 0.0
    obs, exp = counts[support], expected[support] * n
    small = exp < 5.0
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    if obs.shape[0] == 1:
        return 1.0 if obs[0] == n else 0.0
    return float(chisquare(obs, exp * (obs.sum() / exp.sum())).pvalue)


def chi2_pvalue_against(samples: list[int], expected: np.ndarray) -> float:
    """Like ``chi2_pvalue`` but a sample outside ``expected``'s support just means "not this law"."""
    counts = np.bincount(np.asarray(samples, dtype=np.int64), minlength=expected.shape[0])
    if np.any(counts * (expected == 0.0)):
        return 0.0
    return chi2_pvalue(samples, expected)


def fixed_logits(rows: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


STAT_CONFIGS: list[dict[str, Any]] = [
    {"temperature": 0.7},
    {"temperature": 1.3},
    {"temperature": 1.0, "top_k": 3},
    {"temperature": 0.9, "top_p": 0.8},
    {"temperature": 1.1, "min_p": 0.15},
]


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_q", "point_mass"])
@pytest.mark.parametrize("config", STAT_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_output_follows_target_not_draft(config: dict[str, Any], point_mass: bool) -> None:
    """Each emitted position j (given drafts[:j] accepted) follows the target's processed p_j, not q_j."""
    k = 2
    params = SamplingParams(**config)
    target = fixed_logits(k + 1, seed=11)  # different target logits per position
    draft_logits = target[:k] + fixed_logits(k, seed=29, scale=0.8)  # a related but different model
    p_ref = [reference_probs(target[j].numpy(), **config) for j in range(k + 1)]

    # q: the draft processed with the same stages, as a draft model's must be.  Point-mass
    # proposals (prompt lookup) are drawn from the same q but verified as one-hot: exact for any
    # proposal law that does not look at the verifier's draws.
    q = processed_probs(draft_logits, SamplingBatch.from_params([params] * k))
    for j in range(k):  # the proposal law really differs from the target
        assert 0.5 * float((q[j].double() - torch.from_numpy(p_ref[j])).abs().sum()) > 0.25
    torch.manual_seed(0)
    draft_rows = torch.stack([torch.multinomial(q[j], NUM_TRIALS, replacement=True) for j in range(k)], dim=1)
    drafts = draft_rows.numpy().tolist()  # numpy: torch builds nested lists row by row, slowly
    batch = VerificationBatch.build(
        [params] * NUM_TRIALS, [None] * NUM_TRIALS, [[]] * NUM_TRIALS, [[]] * NUM_TRIALS,
        drafts, [[]] * NUM_TRIALS,
    )
    p = processed_probs(target, SamplingBatch.from_params([params] * (k + 1)))
    np.testing.assert_allclose(p.double().numpy(), np.stack(p_ref), atol=1e-6)

    draft_probs = None if point_mass else q.repeat(NUM_TRIALS, 1)
    out = RejectionSampler()(target.repeat(NUM_TRIALS, 1), batch, draft_probs)

    assert all(len(t) == a + 1 for t, a in zip(out.token_ids, out.num_accepted))
    assert all(t[:a] == d[:a] for t, a, d in zip(out.token_ids, out.num_accepted, drafts))
    # First-draft acceptance rate is sum_x min(p, q) (point mass: E_q[p(x)]); 5 binomial sigmas.
    q0 = q[0].double().numpy()
    rate = float(np.minimum(p_ref[0], q0).sum()) if not point_mass else float((p_ref[0] * q0).sum())
    observed = np.mean([a >= 1 for a in out.num_accepted])
    assert abs(observed - rate) < 5 * np.sqrt(rate * (1 - rate) / NUM_TRIALS) + 1e-9

    for j in range(k + 1):
        emitted = [t[j] for t, a in zip(out.token_ids, out.num_accepted) if a >= j]
        assert len(emitted) > 250
        assert chi2_pvalue(emitted, p_ref[j]) > 1e-3, f"position {j} does not follow the target"
    first = [t[0] for t in out.token_ids]
    assert chi2_pvalue_against(first, q[0].double().numpy()) < 1e-6, "the output follows the draft"


def test_draft_outside_target_support_is_never_accepted() -> None:
    """p(x) = 0 (outside top-k, or a blocked EOS under min_tokens) is rejected whatever q(x) and u are."""
    n = 2_000
    target = fixed_logits(2, seed=3)
    outside = int(target[0].argsort()[0])  # the least likely token: outside top-3
    eos = int(target[1].argmax())
    params = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, min_tokens=5)]
    batch = VerificationBatch.build(
        [params[i % 2] for i in range(n)], [None] * n, [[]] * n, [[]] * n,
        [[outside] if i % 2 == 0 else [eos] for i in range(n)], [[eos]] * n,
    )
    logits = torch.cat([target[i % 2].expand(2, V) for i in range(n)])
    # q(x) = 0 too, so u * q(x) <= p(x) holds: only the p(x) > 0 guard rejects.
    q = torch.full((n, V), 1.0 / (V - 1))
    q[torch.arange(n), torch.tensor([outside if i % 2 == 0 else eos for i in range(n)])] = 0.0
    torch.manual_seed(0)
    out = RejectionSampler()(logits, batch, q)
    assert out.num_accepted == [0] * n
    kept = set(target[0].topk(3).indices.tolist())
    assert all(t[0] in kept for t in out.token_ids[0::2])
    assert all(t[0] != eos for t in out.token_ids[1::2])


def greedy_token(sampler: Sampler, row: torch.Tensor, params: SamplingParams, history: list[int],
                 prompt: list[int], eos: list[int]) -> int:
    """The plain Sampler on one row, with the blocking Request.blocked_token_ids would give."""
    blocked = eos + list(params.stop_token_ids) if len(history) < params.min_tokens else []
    batch = SamplingBatch.from_params([params], output_token_ids=[history], prompt_token_ids=[prompt],
                                      blocked_token_ids=[blocked])
    return int(sampler(row.unsqueeze(0), batch).token_ids[0])


def test_greedy_accepts_exactly_while_argmax_matches() -> None:
    """Greedy rows: the emitted tokens equal the step-by-step argmax, with penalties and min_tokens per row."""
    k, eos = 4, [0]
    configs = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.8, min_tokens=3, stop_token_ids=[5]),
        SamplingParams(temperature=0.7, top_k=1, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0.0, presence_penalty=2.0, min_tokens=2),
    ]
    gen = torch.Generator().manual_seed(5)
    sampler = Sampler()
    cases = []
    changed = 0
    for i in range(24):
        params = configs[i % len(configs)]
        logits = torch.randn(k + 1, V, generator=gen)
        logits[:, 0] += 2.5  # EOS is often the raw argmax: min_tokens must block it
        logits[:, 1] += 2.0  # so is token 1, which penalties push down once seen
        outputs, prompt = [1] * (i % 3), [2, 1, 3]
        chain: list[int] = []  # the target's own greedy continuation, position by position
        for j in range(k + 1):
            chain.append(greedy_token(sampler, logits[j], params, outputs + chain, prompt, eos))
        changed += chain != logits.argmax(-1).tolist()
        bad = i % (k + 1)  # the first wrong draft (k: all right)
        drafts = chain[:k]
        if bad < k:
            drafts[bad] = (drafts[bad] + 1 + i % (V - 1)) % V
        cases.append((params, logits, outputs, prompt, drafts, chain[: bad + 1], bad))
    assert changed >= 6, "penalties / blocking rarely changed an argmax: the test has little power"

    batch = VerificationBatch.build(
        [c[0] for c in cases], [torch.Generator().manual_seed(1) for _ in cases], [c[2] for c in cases],
        [c[3] for c in cases], [c[4] for c in cases], [eos] * len(cases),
    )
    out = RejectionSampler()(torch.cat([c[1] for c in cases]), batch, torch.full((k * len(cases), V), 1.0 / V))
    assert out.token_ids == [c[5] for c in cases]
    assert out.num_accepted == [c[6] for c in cases]
    fresh = torch.Generator().manual_seed(1).get_state()
    assert all(torch.equal(g.get_state(), fresh) for g in batch.sampling.generators if g is not None), (
        "greedy rows drew from their generator"
    )


def test_build_rows_count_drafts_and_block_under_min_tokens() -> None:
    params = [SamplingParams(temperature=1.0, min_tokens=3, frequency_penalty=0.5, stop_token_ids=[9]),
              SamplingParams(temperature=1.0, min_tokens=3, ignore_eos=True)]
    batch = VerificationBatch.build(params, [None, None], [[4], [4]], [[1], [1]], [[5, 6, 7], []], [[0], [0]])
    s = batch.sampling
    assert s.batch_size == 5
    assert s.output_token_ids[:4] == [[4], [4, 5], [4, 5, 6], [4, 5, 6, 7]]
    assert s.blocked_token_ids == [[0, 9], [0, 9], [], [], []]
    assert batch.num_logprobs == [None, None]


def run_seeded(requests: list[tuple[int | None, int]], logits: torch.Tensor, q: torch.Tensor,
               point_mass: bool) -> list[list[int]]:
    """Verify (seed, drafts-variant) requests: all share the same K = 3 rows but differ in drafts."""
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=s) for s, _ in requests]
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s, _ in requests]
    drafts = [[(v + j) % V for j in range(3)] for _, v in requests]
    batch = VerificationBatch.build(params, gens, [[]] * len(requests), [[]] * len(requests), drafts,
                                    [[]] * len(requests))
    n = len(requests)
    out = RejectionSampler()(logits.repeat(n, 1), batch, None if point_mass else q.repeat(n, 1))
    return out.token_ids


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_q", "point_mass"])
def test_seeded_requests_are_reproducible_and_independent_of_the_batch(point_mass: bool) -> None:
    logits = fixed_logits(4, seed=8, scale=0.7)
    q = torch.softmax(fixed_logits(3, seed=9), dim=-1)
    seeded = [(s, s % V) for s in range(40)]
    torch.manual_seed(0)
    alone = [run_seeded([r], logits, q, point_mass)[0] for r in seeded]
    torch.manual_seed(0)
    assert run_seeded(seeded, logits, q, point_mass) == alone
    assert len({tuple(t) for t in alone}) > 5, "different seeds should give different tokens"
    # Interleaved with unseeded and other seeded requests, in another order and another global RNG state.
    mixed = [x for r in reversed(seeded) for x in (r, (None, 3), (1000 + r[0], 1))]
    torch.manual_seed(123)
    tokens = run_seeded(mixed, logits, q, point_mass)
    assert tokens[0::3] == list(reversed(alone))


def test_seeded_draw_order() -> None:
    """A seeded request draws K uniforms, then one Exp(1) race of width V, whatever it accepts."""
    params = SamplingParams(temperature=1.0, seed=7)
    g = torch.Generator().manual_seed(7)
    batch = VerificationBatch.build([params], [g], [[]], [[]], [[1, 2, 3]], [[]])
    RejectionSampler()(fixed_logits(4, seed=1), batch, None)
    ref = torch.Generator().manual_seed(7)
    torch.rand(3, generator=ref)
    torch.empty(V).exponential_(generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_no_drafts_is_the_plain_sampler() -> None:
    """K = 0: one token per request, identical to Sampler (same stages and the same single race draw)."""
    configs = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.8, top_k=4, seed=3, frequency_penalty=0.7),
        SamplingParams(temperature=1.2, top_p=0.7, seed=4, min_tokens=2),
        SamplingParams(temperature=1.0, min_p=0.1, seed=5, presence_penalty=1.0),
    ]
    n = 40
    params = [configs[i % 4] for i in range(n)]
    logits = fixed_logits(n, seed=21)
    outputs = [[i % V, (3 * i) % V] if i % 3 else [] for i in range(n)]
    prompts = [[1, 2]] * n
    blocked = [[0] if len(o) < p.min_tokens else [] for o, p in zip(outputs, params)]

    def gens() -> list[torch.Generator | None]:
        return [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]

    expected = Sampler()(logits, SamplingBatch.from_params(params, gens(), outputs, prompts, blocked)).token_ids
    batch = VerificationBatch.build(params, gens(), outputs, prompts, [[]] * n, [[0]] * n)
    out = RejectionSampler()(logits, batch, torch.empty(0, V))
    assert out.num_accepted == [0] * n
    assert out.token_ids == [[t] for t in expected.tolist()]


def test_logprobs_are_raw_target_log_softmax_per_emitted_token() -> None:
    params = [SamplingParams(temperature=0.5, top_k=2, repetition_penalty=2.0, logprobs=3),
              SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, logprobs=0, frequency_penalty=1.0)]
    drafts = [[1, 2], [3], [4, 5, 6]]
    logits = fixed_logits(9, seed=13).to(torch.bfloat16)
    batch = VerificationBatch.build(params, [None] * 3, [[1], [], [4]], [[2]] * 3, drafts, [[]] * 3)
    torch.manual_seed(0)
    out = RejectionSampler()(logits, batch, None)
    assert out.logprobs[1] is None
    raw = torch.log_softmax(logits.double(), dim=-1)
    for i, start in ((0, 0), (2, 5)):
        entries = out.logprobs[i]
        assert entries is not None and [e.token_id for e in entries] == out.token_ids[i]
        for j, e in enumerate(entries):
            assert e.logprob == pytest.approx(float(raw[start + j, e.token_id]), abs=1e-5)
            k = params[i].logprobs or 0
            assert e.top_ids == raw[start + j].topk(k).indices.tolist()
            assert e.top_logprobs == pytest.approx(raw[start + j].topk(k).values.tolist(), abs=1e-5)


def test_rejects_misshapen_inputs() -> None:
    batch = VerificationBatch.build([SamplingParams()], [None], [[]], [[]], [[1, 2]], [[]])
    with pytest.raises(ValueError, match="target_logits"):
        RejectionSampler()(torch.zeros(2, V), batch)
    with pytest.raises(ValueError, match="draft_probs"):
        RejectionSampler()(torch.zeros(3, V), batch, torch.zeros(3, V))
    with pytest.raises(ValueError, match="draft token ids"):
        RejectionSampler()(torch.zeros(3, 2), batch)


def test_empty_residual_falls_back_to_p() -> None:
    """q >= p everywhere (here q = 2p, so half the drafts are rejected) leaves no residual: resample from p."""
    n = 4_000
    params = SamplingParams(temperature=1.0, top_k=5)
    target = fixed_logits(2, seed=17)
    p_ref = reference_probs(target[0].numpy(), 1.0, top_k=5)
    q = 2 * processed_probs(target[:1], SamplingBatch.from_params([params]))
    torch.manual_seed(0)
    drafts = torch.multinomial(q[0], n, replacement=True).numpy().tolist()
    batch = VerificationBatch.build([params] * n, [None] * n, [[]] * n, [[]] * n, [[d] for d in drafts], [[]] * n)
    out = RejectionSampler()(target.repeat(n, 1), batch, q.repeat(n, 1))
    rejected = [t[0] for t, a in zip(out.token_ids, out.num_accepted) if a == 0]
    assert abs(len(rejected) / n - 0.5) < 5 * np.sqrt(0.25 / n)
    assert chi2_pvalue(rejected, p_ref) > 1e-3


def test_plain_greedy_verification_equals_the_sampler() -> None:
    """`verify_plain_greedy` (the runner's path when every request is plain greedy) emits what the
    rejection sampler does, on rows with every first-mismatch position, ties in the argmax included."""
    from kvflow.worker.rejection_sampler import plain_greedy, verify_plain_greedy

    gen = torch.Generator().manual_seed(7)
    params = SamplingParams(temperature=0.0)
    assert plain_greedy(params, 0) and not plain_greedy(SamplingParams(temperature=0.0, min_tokens=2), 1)
    assert not plain_greedy(SamplingParams(temperature=0.0, repetition_penalty=1.1), 5)
    assert not plain_greedy(SamplingParams(temperature=0.8), 5)
    drafts: list[list[int]] = []
    rows = []
    for i in range(12):
        k = i % 5  # K = 0 too: a plain decode row
        logits = torch.randn(k + 1, V, generator=gen)
        if i % 3 == 0:
            logits[:, 3] = logits.max(dim=-1).values  # a tie: the first maximum wins, as in argmax
        best = logits.argmax(-1).tolist()
        d = best[:k]
        if k and i % 2:
            bad = i % k
            d[bad] = (d[bad] + 1) % V
        drafts.append(d)
        rows.append(logits)
    target = torch.cat(rows)
    batch = VerificationBatch.build([params] * len(drafts), [None] * len(drafts), [[]] * len(drafts),
                                    [[1, 2]] * len(drafts), drafts, [[0]] * len(drafts))
    assert verify_plain_greedy(target, drafts) == RejectionSampler()(target, batch).token_ids
    with pytest.raises(ValueError):
        verify_plain_greedy(target[:-1], drafts)
