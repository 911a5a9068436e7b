"""Tests for the vectorised Sampler.

The statistical tests compare empirical token frequencies against an
independently computed (numpy, float64, per-token loops) reference
distribution with a chi-square test.  The torch RNG is seeded in each test, so
they are deterministic, yet any wrong truncation / temperature / mixing of rows
shifts the frequencies far beyond the p > 1e-3 threshold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from kvflow.sampling_params import SamplingParams
from kvflow.worker.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    token_counts,
)

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def make_batch(params: list[SamplingParams], **kwargs: Any) -> SamplingBatch:
    return SamplingBatch.from_params(params, **kwargs)


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_distribution(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    """Naive float64 reference: softmax(l/T), top-k, top-p, min-p, renormalise.

    Asserts that the configuration is not within rounding distance of a
    truncation boundary, so float32 vs float64 cannot legitimately disagree.
    """
    v = logits.shape[0]
    probs = softmax64(logits.astype(np.float64) / temperature)
    order = sorted(range(v), key=lambda i: -probs[i])
    keep = [True] * v
    if top_k > 0:
        for rank, tok in enumerate(order):
            if rank >= top_k:
                keep[tok] = False
    probs = np.array([probs[i] if keep[i] else 0.0 for i in range(v)])
    probs /= probs.sum()
    if top_p < 1.0:
        cumulative = 0.0
        reached = False
        for tok in order:
            if not keep[tok]:
                continue
            if reached:
                keep[tok] = False
                continue
            cumulative += probs[tok]
            assert abs(cumulative - top_p) > 1e-4, "test logits too close to a top-p boundary"
            if cumulative >= top_p:
                reached = True
        probs = np.array([probs[i] if keep[i] else 0.0 for i in range(v)])
        probs /= probs.sum()
    if min_p > 0.0:
        threshold = min_p * probs.max()
        for i in range(v):
            if keep[i]:
                assert abs(probs[i] - threshold) > 1e-6, "test logits too close to a min-p boundary"
                if probs[i] < threshold:
                    keep[i] = False
        probs = np.array([probs[i] if keep[i] else 0.0 for i in range(v)])
        probs /= probs.sum()
    return probs


def assert_matches_distribution(samples: torch.Tensor, expected: np.ndarray) -> None:
    """Chi-square goodness of fit, pooling bins with expected count < 5; zero-prob bins must be empty."""
    n = samples.numel()
    counts = np.bincount(samples.numpy(), minlength=expected.shape[0]).astype(np.float64)
    outside = expected == 0.0
    leaked = np.nonzero(counts * outside)[0]
    assert leaked.size == 0, f"sampled tokens outside the support: {leaked}"
    support = ~outside
    obs, exp = counts[support], expected[support] * n
    small = exp < 5.0
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    if obs.shape[0] == 1:
        assert obs[0] == n
        return
    pvalue = chisquare(obs, exp * (obs.sum() / exp.sum())).pvalue
    assert pvalue > 1e-3, f"chi-square p={pvalue:.2e}\nobserved={obs}\nexpected={exp}"


def fixed_logits(vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=gen) * scale


# --------------------------------------------------------------------------
# Statistical tests
# --------------------------------------------------------------------------

NUM_SAMPLES = 20_000

STAT_CONFIGS: list[dict[str, Any]] = [
    {"temperature": 1.0},
    {"temperature": 0.5},
    {"temperature": 2.0},
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 0.8, "top_k": 12},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 1.5, "top_p": 0.5},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 2.0, "min_p": 0.05},
    {"temperature": 0.7, "top_k": 10, "top_p": 0.9},
    {"temperature": 1.3, "top_p": 0.9, "min_p": 0.05},
    {"temperature": 1.0, "top_k": 20, "min_p": 0.1},
    {"temperature": 1.2, "top_k": 15, "top_p": 0.85, "min_p": 0.02},
]


@pytest.mark.parametrize("config", STAT_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampling_matches_reference_distribution(config: dict[str, Any]) -> None:
    vocab = 40
    logits = fixed_logits(vocab, seed=1234)
    expected = reference_distribution(
        logits.numpy(),
        config["temperature"],
        config.get("top_k", 0),
        config.get("top_p", 1.0),
        config.get("min_p", 0.0),
    )
    params = SamplingParams(**config)
    batch = make_batch([params] * NUM_SAMPLES)
    torch.manual_seed(0)
    out = Sampler()(logits.expand(NUM_SAMPLES, vocab), batch)
    assert out.token_ids.shape == (NUM_SAMPLES,)
    assert out.token_ids.dtype == torch.int64
    assert_matches_distribution(out.token_ids, expected)


def test_heterogeneous_batch_each_row_uses_its_own_params_and_logits() -> None:
    """Interleaved rows with different logits/params (and greedy rows) must not leak into each other."""
    vocab = 30
    configs = [
        {"temperature": 1.0},
        {"temperature": 0.6, "top_k": 4},
        {"temperature": 1.4, "top_p": 0.7},
        {"temperature": 1.0, "min_p": 0.2},
        {"temperature": 0.0},
        {"temperature": 0.9, "top_k": 1},
    ]
    rows_per_config = 6_000
    logit_rows = [fixed_logits(vocab, seed=100 + i) for i in range(len(configs))]
    order = [i % len(configs) for i in range(rows_per_config * len(configs))]
    logits = torch.stack([logit_rows[c] for c in order])
    config_params = [SamplingParams(**config) for config in configs]
    params = [config_params[c] for c in order]
    torch.manual_seed(1)
    out = Sampler()(logits, make_batch(params))
    config_of_row = torch.tensor(order)
    for c, config in enumerate(configs):
        samples = out.token_ids[config_of_row == c]
        if SamplingParams(**config).greedy:
            assert torch.all(samples == logit_rows[c].argmax())
            continue
        expected = reference_distribution(
            logit_rows[c].numpy(),
            config["temperature"],
            config.get("top_k", 0),
            config.get("top_p", 1.0),
            config.get("min_p", 0.0),
        )
        assert_matches_distribution(samples, expected)


def test_seeded_rows_follow_the_distribution() -> None:
    """Per-row generator path: one draw from each of many seeds is a sample of the same law."""
    vocab = 16
    logits = fixed_logits(vocab, seed=7)
    n = 5_000
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=s) for s in range(n)]
    generators: list[torch.Generator | None] = [torch.Generator().manual_seed(s) for s in range(n)]
    out = Sampler()(logits.expand(n, vocab), make_batch(params, generators=generators))
    expected = reference_distribution(logits.numpy(), 0.9, 0, 0.9, 0.0)
    assert_matches_distribution(out.token_ids, expected)


def test_bf16_logits_are_upcast() -> None:
    vocab = 24
    logits = fixed_logits(vocab, seed=5).bfloat16()
    expected = reference_distribution(logits.float().numpy(), 1.0, 6, 1.0, 0.0)
    torch.manual_seed(2)
    out = Sampler()(logits.expand(NUM_SAMPLES, vocab), make_batch([SamplingParams(top_k=6, logprobs=0)] * NUM_SAMPLES))
    assert out.logprobs.dtype == torch.float32
    assert_matches_distribution(out.token_ids, expected)


# --------------------------------------------------------------------------
# Truncation masks against the naive reference (support sets, per-row params)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("candidates", [1024, 8, 1])
def test_truncation_support_matches_reference_per_row(candidates: int) -> None:
    """Per-row k/p/min_p in one batch; small candidate counts force the full-sort fallback."""
    gen = torch.Generator().manual_seed(11)
    rows, vocab = 96, 50
    logits = torch.randn(rows, vocab, generator=gen) * 3
    top_k = torch.randint(0, 60, (rows,), generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(rows, generator=gen) * 0.98 + 0.02
    top_p[::5] = 1.0
    min_p = torch.rand(rows, generator=gen) * 0.3
    min_p[::4] = 0.0
    before = logits.clone()
    masked = apply_min_p(apply_top_k_top_p(logits, top_k, top_p, top_p_candidates=candidates), min_p)
    assert torch.equal(logits, before)
    checked = 0
    for i in range(rows):
        try:
            expected = reference_distribution(
                logits[i].numpy(), 1.0, int(top_k[i]), float(top_p[i]), float(min_p[i])
            )
        except AssertionError:
            continue  # too close to a boundary for a float32 vs float64 comparison
        checked += 1
        got = torch.isfinite(masked[i]).numpy()
        assert np.array_equal(got, expected > 0), f"row {i}: k={int(top_k[i])} p={float(top_p[i])}"
        # Surviving logits are untouched.
        assert torch.equal(masked[i][torch.from_numpy(got)], logits[i][torch.from_numpy(got)])
    assert checked >= rows - 6


def test_truncation_never_mutates_inputs() -> None:
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(6, 40, generator=gen)
    before = logits.clone()
    top_p = torch.tensor([0.5, 1.0, 0.3, 1.0, 0.9, 1.0])
    out = apply_top_k_top_p(logits, None, top_p)
    assert torch.equal(logits, before)
    assert torch.equal(out[1], logits[1]) and not torch.isfinite(out[2]).all()
    apply_min_p(logits, torch.full((6,), 0.5))
    assert torch.equal(logits, before)
    # The whole sampler at temperature 1 (no copy made by the temperature stage).
    params = [SamplingParams(top_p=float(p)) for p in top_p]
    Sampler()(logits, make_batch(params))
    assert torch.equal(logits, before)


def test_top_k_keeps_ties_with_kth_value() -> None:
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 2]), None)
    assert torch.isfinite(out).tolist() == [
        [True, True, True, False, True, False],
        [False, False, False, False, True, True],
    ]


def test_top_p_one_keeps_every_token_and_top_token_always_kept() -> None:
    logits = torch.tensor([[30.0] + [-30.0] * 99, [1.0] * 100])
    out = apply_top_k_top_p(logits, None, torch.tensor([1.0, 1.0]))
    assert torch.isfinite(out).all()
    tiny_p = apply_top_k_top_p(logits, None, torch.tensor([1e-6, 1e-6]))
    assert torch.isfinite(tiny_p).sum(dim=1).tolist() == [1, 1]
    assert torch.isfinite(tiny_p[0, 0])


def test_top_k_larger_than_vocab_is_a_no_op() -> None:
    logits = torch.randn(3, 10)
    out = apply_top_k_top_p(logits, torch.tensor([0, 10, 1000]), None)
    assert torch.equal(out, logits)


# --------------------------------------------------------------------------
# Greedy, blocked ids, penalties
# --------------------------------------------------------------------------


def test_greedy_equals_argmax_and_does_not_mutate_input() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 1000, generator=gen)
    before = logits.clone()
    greedy, top1 = SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, top_k=1)
    params = [greedy if i % 2 else top1 for i in range(32)]
    out = Sampler()(logits, make_batch(params))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert torch.equal(logits, before)


def test_mixed_greedy_and_random_rows_greedy_rows_are_argmax() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(40, 300, generator=gen)
    greedy, nucleus = SamplingParams(temperature=0.0), SamplingParams(top_p=0.9, top_k=50)
    params = [greedy if i % 3 == 0 else nucleus for i in range(40)]
    before = logits.clone()
    out = Sampler()(logits, make_batch(params))
    greedy_rows = torch.arange(40) % 3 == 0
    assert torch.equal(out.token_ids[greedy_rows], logits[greedy_rows].argmax(dim=-1))
    assert torch.equal(logits, before)


def test_blocked_ids_are_never_sampled() -> None:
    vocab, n = 12, 4_000
    logits = torch.zeros(n, vocab)
    logits[:, 3] = 8.0  # the blocked tokens dominate the distribution
    logits[:, 7] = 6.0
    blocked = [[3, 7, 10_000] for _ in range(n)]  # out-of-vocab ids are ignored
    params = [SamplingParams(temperature=0.0 if i % 4 == 0 else 1.5) for i in range(n)]
    torch.manual_seed(5)
    out = Sampler()(logits, make_batch(params, blocked_token_ids=blocked))
    assert not torch.isin(out.token_ids, torch.tensor([3, 7])).any()
    # Unblocked rows do sample them.
    out2 = Sampler()(logits, make_batch(params))
    assert (out2.token_ids == 3).sum() > n // 2
    # Blocking is per row.
    blocked_some = [[3] if i % 2 else [] for i in range(n)]
    greedy = [SamplingParams(temperature=0.0)] * n
    out3 = Sampler()(logits, make_batch(greedy, blocked_token_ids=blocked_some))
    assert out3.token_ids.tolist() == [7 if i % 2 else 3 for i in range(n)]


def reference_penalties(
    logits: torch.Tensor,
    outputs: list[list[int]],
    prompts: list[list[int]],
    presence: list[float],
    frequency: list[float],
    repetition: list[float],
) -> torch.Tensor:
    """Per-row, per-token Python reference of HF repetition + OpenAI frequency/presence penalties."""
    result = logits.clone()
    for i in range(logits.shape[0]):
        seen = set(prompts[i]) | set(outputs[i])
        for tok in seen:
            value = float(result[i, tok])
            result[i, tok] = value / repetition[i] if value > 0 else value * repetition[i]
        for tok in set(outputs[i]):
            count = outputs[i].count(tok)
            result[i, tok] = float(result[i, tok]) - frequency[i] * count - presence[i]
    return result


def test_penalties_match_reference() -> None:
    gen = torch.Generator().manual_seed(21)
    rows, vocab = 12, 40
    logits = torch.randn(rows, vocab, generator=gen) * 3
    rng = np.random.default_rng(21)
    outputs = [rng.integers(0, vocab, size=rng.integers(0, 30)).tolist() for _ in range(rows)]
    prompts = [rng.integers(0, vocab, size=rng.integers(0, 20)).tolist() for _ in range(rows)]
    presence = rng.uniform(-2, 2, rows).round(3).tolist()
    frequency = rng.uniform(-2, 2, rows).round(3).tolist()
    repetition = rng.uniform(0.5, 2.0, rows).round(3).tolist()
    presence[0], frequency[0], repetition[0] = 0.0, 0.0, 1.0  # neutral row stays untouched
    repetition[1] = 1.0  # additive only
    presence[2], frequency[2] = 0.0, 0.0  # repetition only
    expected = reference_penalties(logits, outputs, prompts, presence, frequency, repetition)
    got = apply_penalties(
        logits,
        outputs,
        prompts,
        torch.tensor(presence),
        torch.tensor(frequency),
        torch.tensor(repetition),
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], logits[0])

    # End to end: greedy rows pick the argmax of the penalised logits.
    params = [
        SamplingParams(
            temperature=0.0,
            logprobs=0,
            presence_penalty=presence[i],
            frequency_penalty=frequency[i],
            repetition_penalty=repetition[i],
        )
        for i in range(rows)
    ]
    batch = make_batch(params, output_token_ids=outputs, prompt_token_ids=prompts)
    assert batch.any_penalty and batch.any_repetition_penalty and batch.any_additive_penalty
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, expected.argmax(dim=-1))
    # Returned logprobs stay raw (unpenalised).
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))


def test_repetition_penalty_counts_prompt_but_frequency_does_not() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rep = apply_penalties(logits, [[]], [[0, 1]], torch.zeros(1), torch.zeros(1), torch.tensor([2.0]))
    torch.testing.assert_close(rep, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    freq = apply_penalties(
        logits, [[2, 2]], [[0, 1]], torch.tensor([0.5]), torch.tensor([0.25]), torch.ones(1)
    )
    torch.testing.assert_close(freq, torch.tensor([[2.0, -2.0, 0.0, 0.5]]))


def test_token_counts() -> None:
    counts = token_counts([[1, 1, 3], [], [0]], 4)
    assert counts.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        token_counts([[4]], 4)
    with pytest.raises(ValueError):
        token_counts([[-1]], 4)


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------


def run_seeded_sequence(seed: int, position: int, neighbours: list[SamplingParams], steps: int) -> list[int]:
    """Decode `steps` tokens for one seeded row placed at `position` among `neighbours`."""
    vocab = 3000  # > TOP_P_CANDIDATES, so both top-p paths are exercised
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    neighbour_gens = [
        torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in neighbours
    ]
    sampler = Sampler()
    tokens: list[int] = []
    for step in range(steps):
        step_gen = torch.Generator().manual_seed(10_000 + step)
        step_logits = torch.randn(vocab, generator=step_gen) * (1.0 if step % 2 else 4.0)
        params = list(neighbours)
        params.insert(position, target)
        gens = list(neighbour_gens)
        gens.insert(position, generator)
        logits = torch.randn(len(params), vocab)  # neighbours' logits vary run to run
        logits[position] = step_logits
        out = sampler(logits, make_batch(params, generators=gens))
        tokens.append(int(out.token_ids[position]))
    return tokens


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    torch.manual_seed(123)
    alone = run_seeded_sequence(42, 0, [], steps=12)
    torch.manual_seed(456)
    crowded = run_seeded_sequence(
        42,
        3,
        [
            SamplingParams(temperature=0.0),
            SamplingParams(top_k=3),
            SamplingParams(seed=7, top_p=0.5),
            SamplingParams(temperature=0.3, min_p=0.1),
            SamplingParams(seed=42),
            SamplingParams(top_k=2500, top_p=0.6),
            SamplingParams(top_k=1500, frequency_penalty=0.5),
        ],
        steps=12,
    )
    torch.manual_seed(789)
    last = run_seeded_sequence(42, 2, [SamplingParams(), SamplingParams(temperature=1.7)], steps=12)
    assert alone == crowded == last
    other_seed = run_seeded_sequence(43, 0, [], steps=12)
    assert other_seed != alone


def test_seeded_batch_requires_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        SamplingBatch.from_params([SamplingParams(seed=1)])
    # Greedy rows never draw, so they need none.
    SamplingBatch.from_params([SamplingParams(seed=1, temperature=0.0)])


# --------------------------------------------------------------------------
# Logprobs and batch construction
# --------------------------------------------------------------------------


def test_logprobs_are_raw_and_top_k_matches_topk() -> None:
    gen = torch.Generator().manual_seed(8)
    rows, vocab = 10, 200
    logits = (torch.randn(rows, vocab, generator=gen) * 2).bfloat16()
    params = [
        SamplingParams(
            temperature=0.5, top_k=20, logprobs=i % 6, repetition_penalty=1.3, frequency_penalty=0.4
        )
        for i in range(rows)
    ]
    outputs = [[1, 2, 3]] * rows
    out = Sampler()(logits, make_batch(params, output_token_ids=outputs, prompt_token_ids=[[4]] * rows))
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert out.top_token_ids.shape == (rows, 5) and out.top_token_ids.dtype == torch.int64
    ref_lp, ref_ids = torch.topk(raw, 5, dim=-1)
    assert torch.equal(out.top_token_ids, ref_ids)
    torch.testing.assert_close(out.top_logprobs, ref_lp)


def test_no_top_logprobs_when_not_requested() -> None:
    logits = torch.randn(3, 10)
    params = [SamplingParams(logprobs=0), SamplingParams(), SamplingParams(temperature=0)]
    out = Sampler()(logits, make_batch(params))
    assert isinstance(out, SamplerOutput)
    assert out.top_token_ids is None and out.top_logprobs is None
    assert out.logprobs.shape == (3,)
    assert torch.all(out.logprobs <= 0)


def test_batch_flags_and_validation() -> None:
    batch = make_batch([SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2), SamplingParams()])
    # Truncation on greedy rows is irrelevant, so those stages are skipped.
    assert batch.any_greedy and not batch.all_greedy
    assert not (batch.any_top_k or batch.any_top_p or batch.any_min_p)
    assert not (batch.any_penalty or batch.any_blocked or batch.any_temperature)
    assert batch.random_rows.tolist() == [1]
    assert make_batch([SamplingParams(temperature=0.0)] * 3).all_greedy
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch.from_params([SamplingParams()], generators=[None, None])
    with pytest.raises(ValueError, match="output_token_ids"):
        SamplingBatch.from_params([SamplingParams()], output_token_ids=[[], []])
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.randn(2, 10), make_batch([SamplingParams()]))


def test_empty_batch() -> None:
    out = Sampler()(torch.randn(0, 10), make_batch([]))
    assert out.token_ids.shape == (0,)
    assert out.logprobs is None  # no row asked


def test_extreme_logits_never_pick_masked_tokens() -> None:
    """A zero Exp(1) draw or huge logits must not let a -inf token win via NaN."""
    vocab, n = 8, 5_000
    logits = torch.full((n, vocab), -1e4)
    logits[:, 0] = 1e4
    logits[:, 1] = 1e4 - 1.0
    torch.manual_seed(9)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=1.0, top_k=2, logprobs=0)] * n))
    assert set(out.token_ids.tolist()) <= {0, 1}
    assert math.isfinite(float(out.logprobs.min()))


def test_logprobs_are_skipped_when_no_row_asks() -> None:
    """A batch without logprobs gets the same tokens and no logprob tensors (no log_softmax)."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(9))
    plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3)] * 3
    asked = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.7, seed=3, logprobs=2)] * 3
    gens = lambda: [None if p.greedy else torch.Generator().manual_seed(3) for p in plain]  # noqa: E731
    without = Sampler()(logits, make_batch(plain, generators=gens()))
    with_lps = Sampler()(logits, make_batch(asked, generators=gens()))
    assert without.logprobs is None and without.top_token_ids is None and without.top_logprobs is None
    assert torch.equal(without.token_ids, with_lps.token_ids)
    assert with_lps.logprobs is not None and with_lps.top_logprobs is not None
    with pytest.raises(ValueError, match="any_logprobs"):
        dataclasses.replace(make_batch(plain, generators=gens()), max_num_logprobs=2, any_logprobs=False)
