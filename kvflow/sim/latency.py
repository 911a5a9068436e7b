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


def fit_linear(features: np.ndarray, seconds: np.ndarray, relative: bool = True) -> Fit:
    """`seconds ≈ features @ coef` with non-negative coefficients (a latency has no negative part).

    `relative`: minimise relative rather than absolute error, so short iterations (most decode
    steps) are fitted as well as long prefills.
    """
    from scipy.optimize import nnls

    features = np.asarray(features, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != 3 or len(features) != len(seconds):
        raise ValueError(f"need an (n, 3) feature matrix and n latencies, got {features.shape} and {seconds.shape}")
    if len(seconds) < 3 or np.any(seconds <= 0):
        raise ValueError("need at least 3 positive latencies to fit")
    weights = 1.0 / seconds if relative else np.ones_like(seconds)
    scale = np.maximum(np.abs(features).max(axis=0), 1e-30)  # condition the columns before solving
    coef_scaled, _ = nnls(features / scale * weights[:, None], seconds * weights)
    coef = coef_scaled / scale
    predicted = features @ coef
    mape = float(np.mean(np.abs(predicted - seconds) / seconds))
    total = float(np.sum((seconds - seconds.mean()) ** 2))
    r2 = 1.0 - float(np.sum((predicted - seconds) ** 2)) / total if total > 0 else 1.0
    return Fit((float(coef[0]), float(coef[1]), float(coef[2])), mape, r2, len(seconds))


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

    def prefill_time(self, lengths: Sequence[int]) -> float:
        """Seconds for one iteration that computes these whole prompts."""
        return self.iteration_time([(n, 0) for n in lengths], ())

    def decode_time(self, contexts: Sequence[int]) -> float:
        """Seconds for one decode iteration over sequences with these context lengths."""
        return self.iteration_time((), contexts)

    def iteration_time(self, chunks: Sequence[tuple[int, int]], contexts: Sequence[int]) -> float:
        """Seconds for one iteration: prompt chunks `(new tokens, cached tokens)` and decodes of
        these context lengths, batched together (the fixed cost paid once)."""
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

    def to_dict(self) -> dict[str, object]:
        return {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()}

    @classmethod
    def from_dict(cls, doc: dict[str, dict[str, object]]) -> LatencyModel:
        return cls(Fit.from_dict(doc["prefill"]), Fit.from_dict(doc["decode"]))
