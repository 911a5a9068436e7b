"""Per-request KV budgets for `kvflow eval --kv-budget-fraction F`.

One fixed `--kv-budget` means something different to a 512- and a 2048-token prompt (most of the
first, a quarter of the second), so a grid over context lengths would mix "how long" with "how much
was kept". A fraction gives every request the same share of its own prompt instead:
`max(floor, round(F * prompt_tokens))`, where `floor` is the smallest budget the engine accepts for
the policy (sinks + window). The floor is found by asking `kvflow.config.check_kv_policy` itself,
so the rules stay in one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvflow.config import KV_POLICIES, CacheConfig, check_kv_policy


def check_fraction(fraction: float, name: str = "kv_budget_fraction") -> None:
    """Raise ValueError unless 0 < fraction <= 1 (NaN included)."""
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}")


def _accepts(policy: str, budget: int, sink_tokens: int, window: int | None) -> bool:
    try:
        check_kv_policy(policy, budget, sink_tokens, window)
    except ValueError:
        return False
    return True


def min_kv_budget(policy: str, sink_tokens: int, window: int | None, limit: int = 1 << 24) -> int:
    """The smallest kv_budget `check_kv_policy` accepts for (policy, sinks, window).

    Acceptance only grows with the budget (a larger budget never has less room for the sinks and
    the window), so galloping then bisecting finds the edge in a few dozen checks.
    """
    if policy not in KV_POLICIES or policy == "none":
        raise ValueError(f"a budget fraction needs a KV policy ({', '.join(p for p in KV_POLICIES if p != 'none')}),"
                         f" got {policy!r}")
    low, high = 0, 1  # low: rejected (or 0), high: candidate
    while not _accepts(policy, high, sink_tokens, window):
        low, high = high, high * 2
        if high > limit:
            raise ValueError(f"no kv_budget up to {limit} fits kv_policy={policy} with kv_sink_tokens={sink_tokens}"
                             f" and kv_window={window}")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _accepts(policy, mid, sink_tokens, window) else (mid, high)
    return high


@dataclass(frozen=True)
class KVBudgetRule:
    """How an evaluation sizes each request's `kv_budget` from its prompt."""

    policy: str
    fraction: float
    floor: int

    def budget(self, prompt_tokens: int) -> int:
        return max(self.floor, round(self.fraction * prompt_tokens))

    def kept_share(self, prompt_lengths: Iterable[int]) -> float | None:
        """The share of the prompts' tokens their budgets cover (a prompt within its budget keeps all)."""
        lengths = list(prompt_lengths)
        total = sum(lengths)
        return sum(min(n, self.budget(n)) for n in lengths) / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "fraction": self.fraction, "floor": self.floor}


def budget_rule(cache: CacheConfig, fraction: float) -> KVBudgetRule:
    """The rule for an engine's cache config: its policy, its sinks and window set the floor."""
    check_fraction(fraction)
    if cache.kv_policy == "none":
        raise ValueError("kv_budget_fraction sets each request's budget for the engine's KV policy; start the "
                         "engine with kv_policy streaming, h2o, snapkv, quest or specontext")
    return KVBudgetRule(cache.kv_policy, float(fraction),
                        min_kv_budget(cache.kv_policy, cache.kv_sink_tokens, cache.kv_window))
