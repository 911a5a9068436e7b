"""Iteration latency of one engine instance, in DistServe's form, fitted to measurements.

DistServe models a prefill iteration as `a + b·Σlen + c·Σlen²` (linear layers scale with the
tokens, attention with the squares of the prompt lengths) and a decode iteration as
`a + b·Σctx + c·batch` (reading the weights is the constant, reading every sequence's KV the
context term, the per-token work the batch term). kvflow adds the mixed iteration of colocated
serving with chunked prefill: a chunk of `l` new tokens after `p` cached ones costs attention
`l² + 2·l·p` (so a prompt's chunks add up to `len²`), and the decodes batched with it add their
context and batch terms; the constant is paid once.

A `LatencyModel` is what the profiler fits (`kvflow profile`), what the hardware catalogue
derives for GPUs it has no measurement of, and what the simulator asks for every iteration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Fit:
    """Least-squares coefficients and how well they explain the samples they came from."""

    coef: tuple[float, float, float]
    mape: float  # mean absolute percentage error over the samples (0.05 = 5 %)
    r2: float
    num_samples: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, object]) -> Fit:
        coef = doc["coef"]
        assert isinstance(coef, (list, tuple)) and len(coef) == 3, f"a fit needs 3 coefficients, got {coef!r}"
        return cls((float(coef[0]), float(coef[1]), float(coef[2])), float(doc["mape"]),  # type: ignore[arg-type]
                   float(doc["r2"]), int(doc["num_samples"]))  # type: ignore[arg-type]


def _nnls(features: np.ndarray, seconds: np.ndarray, relative: bool) -> tuple[np.ndarray, float, float]:
    """Non-negative least squares (relative error by default); coefficients, MAPE and R²."""
    from scipy.optimize import nnls

    weights = 1.0 / seconds if relative else np.ones_like(seconds)
    scale = np.maximum(np.abs(features).max(axis=0), 1e-30)  # condition the columns before solving
    coef_scaled, _ = nnls(features / scale * weights[:, None], seconds * weights)
    coef = coef_scaled / scale
    predicted = features @ coef
    mape = float(np.mean(np.abs(predicted - seconds) / seconds))
    total = float(np.sum((seconds - seconds.mean()) ** 2))
    r2 = 1.0 - float(np.sum((predicted - seconds) ** 2)) / total if total > 0 else 1.0
    return coef, mape, r2


def _check(features: np.ndarray, seconds: np.ndarray, columns: int) -> None:
    if features.ndim != 2 or features.shape[1] != columns or len(features) != len(seconds):
        raise ValueError(f"need an (n, {columns}) feature matrix and n latencies, got {features.shape} and "
                         f"{seconds.shape}")
    if len(seconds) < 3 or np.any(seconds <= 0):
        raise ValueError("need at least 3 positive latencies to fit")


def fit_linear(features: np.ndarray, seconds: np.ndarray, relative: bool = True) -> Fit:
    """`seconds ≈ features @ coef` with non-negative coefficients (a latency has no negative part).

    `relative`: minimise relative rather than absolute error, so short iterations (most decode
    steps) are fitted as well as long prefills.
    """
    features = np.asarray(features, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    _check(features, seconds, 3)
    coef, mape, r2 = _nnls(features, seconds, relative)
    return Fit((float(coef[0]), float(coef[1]), float(coef[2])), mape, r2, len(seconds))


def fit_iterations(iterations: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int], float]]) -> LatencyModel:
    """Fit both models at once to iterations of any mix — prompt chunks, decodes or both, as an
    instance's step log records them — with the mixed iterations' constant paid once, as
    `LatencyModel.iteration_time` charges it. Each model's error is over the iterations it governs
    alone (prefill-only, decode-only); mixed ones count towards both."""
    rows, seconds, kinds = [], [], []
    for chunks, contexts, took in iterations:
        _, tokens, attention = prefill_features(chunks) if chunks else (0.0, 0.0, 0.0)
        _, ctx, batch = decode_features(contexts) if contexts else (0.0, 0.0, 0.0)
        rows.append((1.0 if chunks else 0.0, tokens, attention, 0.0 if chunks else 1.0, ctx, batch))
        seconds.append(took)
        kinds.append("p" if not contexts else "d" if not chunks else "m")
    features, times = np.asarray(rows, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    _check(features, times, 6)
    coef, _, _ = _nnls(features, times, relative=True)
    predicted = features @ coef

    def fit(columns: slice, kind: str) -> Fit:
        mask = np.array([k in (kind, "m") for k in kinds])
        err = np.abs(predicted[mask] - times[mask]) / times[mask] if mask.any() else np.zeros(1)
        total = float(np.sum((times[mask] - times[mask].mean()) ** 2)) if mask.any() else 0.0
        r2 = 1.0 - float(np.sum((predicted[mask] - times[mask]) ** 2)) / total if total > 0 else 1.0
        a, b, c = (float(x) for x in coef[columns])
        return Fit((a, b, c), float(err.mean()), r2, int(mask.sum()))

    return LatencyModel(fit(slice(0, 3), "p"), fit(slice(3, 6), "d"))


def prefill_features(chunks: Sequence[tuple[int, int]]) -> tuple[float, float, float]:
    """(1, Σl, Σ(l² + 2·l·p)) for chunks of `l` new tokens after `p` cached ones."""
    return 1.0, float(sum(new for new, _ in chunks)), float(sum(new * new + 2 * new * old for new, old in chunks))


def decode_features(contexts: Sequence[int]) -> tuple[float, float, float]:
    """(1, Σctx, batch) for decoding sequences with these context lengths."""
    return 1.0, float(sum(contexts)), float(len(contexts))


@dataclass(frozen=True)
class LatencyModel:
    prefill: Fit
    decode: Fit
    # Learned corrections on top of the analytic form, as Vidur learns its latencies: a factor per
    # power-of-two bucket of a pure step's size (prefill: tokens; decode: batch size), as
    # (bucket upper bound, factor). Real engines are not linear at small sizes (kvflow's batch-1
    # decode takes a faster path, for one); mixed steps are left to the form.
    prefill_factors: tuple[tuple[int, float], ...] = ()
    decode_factors: tuple[tuple[int, float], ...] = ()
    # Spread of measured steps around the model: the standard deviation of log(measured / model).
    # A simulator draws each iteration's time as model × exp(jitter) (median kept), so latency
    # tails reflect a real machine's jitter rather than a deterministic one's. `noise_memory` is
    # the share of that variance which persists for about `noise_tau_s` seconds (slow spells, see
    # kvflow/sim/noise.py); the rest is drawn afresh each iteration.
    noise_sigma: float = 0.0
    noise_memory: float = 0.0
    noise_tau_s: float = 0.0

    def prefill_time(self, lengths: Sequence[int]) -> float:
        """Seconds for one iteration that computes these whole prompts."""
        return self.iteration_time([(n, 0) for n in lengths], ())

    def decode_time(self, contexts: Sequence[int]) -> float:
        """Seconds for one decode iteration over sequences with these context lengths."""
        return self.iteration_time((), contexts)

    def form_time(self, chunks: Sequence[tuple[int, int]], contexts: Sequence[int]) -> float:
        """The analytic form alone, without corrections."""
        if not chunks and not contexts:
            return 0.0
        pa, pb, pc = self.prefill.coef
        da, db, dc = self.decode.coef
        total = 0.0
        if chunks:
            _, tokens, attention = prefill_features(chunks)
            total += pa + pb * tokens + pc * attention
        if contexts:
            _, ctx, batch = decode_features(contexts)
            total += (0.0 if chunks else da) + db * ctx + dc * batch
        return total

    def iteration_time(self, chunks: Sequence[tuple[int, int]], contexts: Sequence[int]) -> float:
        """Seconds for one iteration: prompt chunks `(new tokens, cached tokens)` and decodes of
        these context lengths, batched together (the fixed cost paid once)."""
        total = self.form_time(chunks, contexts)
        if chunks and not contexts:
            total *= _factor(self.prefill_factors, sum(n for n, _ in chunks))
        elif contexts and not chunks:
            total *= _factor(self.decode_factors, len(contexts))
        return total

    def to_dict(self) -> dict[str, object]:
        return {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict(),
                "prefill_factors": [list(f) for f in self.prefill_factors],
                "decode_factors": [list(f) for f in self.decode_factors], "noise_sigma": self.noise_sigma,
                "noise_memory": self.noise_memory, "noise_tau_s": self.noise_tau_s}

    @classmethod
    def from_dict(cls, doc: dict[str, object]) -> LatencyModel:
        def factors(key: str) -> tuple[tuple[int, float], ...]:
            return tuple((int(b), float(f)) for b, f in doc.get(key, ()))  # type: ignore[union-attr]

        return cls(Fit.from_dict(doc["prefill"]), Fit.from_dict(doc["decode"]),  # type: ignore[arg-type]
                   factors("prefill_factors"), factors("decode_factors"),
                   float(doc.get("noise_sigma", 0.0)), float(doc.get("noise_memory", 0.0)),  # type: ignore[arg-type]
                   float(doc.get("noise_tau_s", 0.0)))  # type: ignore[arg-type]


def bucket(size: int) -> int:
    """The power-of-two bucket (its upper bound) a step size falls in."""
    return 1 << max(0, (size - 1).bit_length())


def _factor(factors: tuple[tuple[int, float], ...], size: int) -> float:
    key = bucket(size)
    for upper, factor in factors:
        if upper == key:
            return factor
    return 1.0


def learn_factors(model: LatencyModel,
                  iterations: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int], float]],
                  min_samples: int = 5) -> LatencyModel:
    """Per-bucket median of measured / form time over the pure steps (the corrections), and the
    spread of every step around the corrected model (its noise)."""
    ratios: dict[tuple[str, int], list[float]] = {}
    for chunks, contexts, took in iterations:
        if bool(chunks) == bool(contexts):
            continue
        kind, size = ("p", sum(n for n, _ in chunks)) if chunks else ("d", len(contexts))
        predicted = model.form_time(chunks, contexts)
        if predicted > 0:
            ratios.setdefault((kind, bucket(size)), []).append(took / predicted)
    learned = {key: float(np.median(r)) for key, r in ratios.items() if len(r) >= min_samples}
    corrected = LatencyModel(
        model.prefill, model.decode,
        tuple(sorted((b, f) for (k, b), f in learned.items() if k == "p")),
        tuple(sorted((b, f) for (k, b), f in learned.items() if k == "d")))
    logs = [math.log(took / t) for chunks, contexts, took in iterations
            if (t := corrected.iteration_time(chunks, contexts)) > 0 and took > 0]
    sigma = float(np.std(logs)) if len(logs) >= min_samples else 0.0
    return dataclasses.replace(corrected, noise_sigma=sigma)


def iteration_errors(model: LatencyModel,
                     iterations: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int], float]]) -> dict[str, float]:
    """Mean absolute percentage error of the model per kind of step (prefill, decode, mixed)."""
    errors: dict[str, list[float]] = {"prefill": [], "decode": [], "mixed": []}
    for chunks, contexts, took in iterations:
        kind = "mixed" if chunks and contexts else "prefill" if chunks else "decode"
        errors[kind].append(abs(model.iteration_time(chunks, contexts) - took) / took)
    return {kind: float(np.mean(e)) for kind, e in errors.items() if e}
