"""Load or recompute: the small performance model that decides whether a tier hit is loaded.

Loading `b` blocks from a tier costs about

    load(b)      = latency(tier) + b * record_bytes / bandwidth(tier)

and computing the same `t = b * block_size` tokens costs about

    recompute(t) = t * seconds_per_token

so a hit is loaded when load < recompute (summed over the tiers its blocks come from). Every term is
measured on this machine, as it runs, with exponential moving averages:

* `seconds_per_token` from the engine's own steps that compute prompt chunks (a step's wall time over
  the tokens it computed; context-length effects are averaged over the prompts seen);
* each tier's bandwidth from its own loads (bytes over the load's time, the copy into the cache
  included), starting from a probe when the tier opens; latency is a fixed per-load overhead
  (the hand-over to an I/O thread and, for the file tier, opening a file).

Before the engine has computed a prompt there is nothing to compare with, so a hit is loaded (right
after a restart this is what the file tier is for). With `kv_offload_load = always` every hit is loaded
(to measure the break-even point: `kvflow bench kv-offload`).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Weight of a new observation in the moving averages.
_EMA = 0.2
#: Steps computing fewer prompt tokens than this say little about a prompt token's cost.
_MIN_PROMPT_TOKENS = 16
#: Loads smaller than this say more about latency than bandwidth.
_MIN_LOAD_BYTES = 1 << 20
#: Fixed cost of one load from each tier (seconds): a thread hand-over, plus opening a file.
TIER_LATENCY_S = {"host": 0.0002, "file": 0.001}


@dataclass
class TierCost:
    latency_s: float
    bytes_per_s: float


class LoadCostModel:
    def __init__(self, record_bytes: int, block_size: int, rule: str = "auto") -> None:
        self.record_bytes = record_bytes
        self.block_size = block_size
        self.rule = rule
        self.seconds_per_token: float | None = None
        self.tiers: dict[str, TierCost] = {}

    def add_tier(self, name: str, bytes_per_s: float) -> None:
        """A tier and its probed bandwidth (the prior its loads then refine)."""
        self.tiers[name] = TierCost(TIER_LATENCY_S.get(name, 0.001), max(bytes_per_s, 1.0))

    # ------------------------------------------------------------- observing
    def observe_step(self, seconds: float, prompt_tokens: int, total_tokens: int) -> None:
        """A step's wall time, with the prompt tokens and all tokens it computed."""
        if prompt_tokens < _MIN_PROMPT_TOKENS or total_tokens <= 0 or seconds <= 0:
            return
        sample = seconds / total_tokens
        old = self.seconds_per_token
        self.seconds_per_token = sample if old is None else (1 - _EMA) * old + _EMA * sample

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        cost = self.tiers.get(tier)
        if cost is None or nbytes < _MIN_LOAD_BYTES or seconds <= 0:
            return
        sample = nbytes / max(seconds - cost.latency_s, 1e-6)
        cost.bytes_per_s = (1 - _EMA) * cost.bytes_per_s + _EMA * sample

    # -------------------------------------------------------------- deciding
    def load_seconds(self, blocks: dict[str, int]) -> float:
        """Estimated time to load `blocks[tier]` blocks from each tier."""
        total = 0.0
        for tier, count in blocks.items():
            if count:
                cost = self.tiers[tier]
                total += cost.latency_s + count * self.record_bytes / cost.bytes_per_s
        return total

    def recompute_seconds(self, num_tokens: int) -> float | None:
        return None if self.seconds_per_token is None else num_tokens * self.seconds_per_token

    def should_load(self, blocks: dict[str, int]) -> bool:
        num_blocks = sum(blocks.values())
        if num_blocks == 0:
            return False
        if self.rule == "always":
            return True
        recompute = self.recompute_seconds(num_blocks * self.block_size)
        return recompute is None or self.load_seconds(blocks) < recompute

    def break_even_blocks(self, tier: str) -> int | None:
        """The fewest blocks from `tier` worth loading now (None: not measured yet, or never)."""
        cost = self.tiers.get(tier)
        if cost is None or self.seconds_per_token is None:
            return None
        per_block = self.block_size * self.seconds_per_token - self.record_bytes / cost.bytes_per_s
        if per_block <= 0:
            return None
        return int(cost.latency_s // per_block) + 1
