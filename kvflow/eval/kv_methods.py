"""The entries of `kvflow eval --compare-kv`: a KV-cache format, a KV policy at a budget fraction, or both.

    int8              every token's KV stored as int8 (all of it kept)
    snapkv@0.25       the model's dtype; each request keeps max(floor, round(0.25 x prompt tokens))
    int8+snapkv@0.25  both: a quarter of the tokens, each at int8's bytes
    kivi2             KIVI's 2-bit codes with the newest tokens dense (no policy; its engine pages in
                      blocks of 32 tokens, see `block_size`)

Parsing is strict and happens before any evaluation runs, so a typo in the eighth entry does not
surface after seven long runs. Each method knows the engine arguments it needs (quest must be the
engine's policy: only then are the per-block key bounds kept), its folder name (safe on any
filesystem: letters, digits, '.', '_' and '-'), and where it sits on the "KV bytes" axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvflow.config import KIVI_CACHE_DTYPES, KIVI_GROUP, KV_CACHE_DTYPES, KV_POLICIES
from kvflow.eval.kv_budget import check_fraction, min_kv_budget

#: Policies that free KV (memory shrinks with the budget); the rest (quest) only read less of it.
EVICTING = ("streaming", "h2o", "snapkv")
_POLICIES = tuple(p for p in KV_POLICIES if p != "none")
#: The block size KIVI methods get where the evaluation's own is not a multiple of KIVI's 32-token groups.
KIVI_BLOCK_SIZE = KIVI_GROUP  # KIVI's blocks hold whole key groups
_SYNTAX = "FORMAT, POLICY@FRACTION or FORMAT+POLICY@FRACTION (e.g. int8, snapkv@0.25, int8+snapkv@0.25)"


@dataclass(frozen=True)
class KVMethod:
    kv_cache_dtype: str = "auto"
    kv_policy: str = "none"
    fraction: float | None = None  # each request's budget share of its prompt (with a policy)

    @property
    def name(self) -> str:
        """The canonical entry text (`.25` and `0.250` both read back as `0.25`)."""
        if self.kv_policy == "none":
            return self.kv_cache_dtype
        policy = f"{self.kv_policy}@{_fraction_text(self.fraction)}"
        return policy if self.kv_cache_dtype == "auto" else f"{self.kv_cache_dtype}+{policy}"

    @property
    def folder(self) -> str:
        """A directory name: the name with '+' and '@' as '-' (neither formats nor policies hold '-')."""
        return self.name.replace("+", "-").replace("@", "-")

    def kv_ratios(self, format_ratio: float, bounds_ratio: float = 0.0) -> tuple[float, float]:
        """(KV bytes kept, KV bytes read per decode step), per token, relative to the model's dtype:
        evicting policies keep and read the fraction; quest keeps everything plus its key bounds
        (`bounds_ratio`, per token) and reads the fraction of the KV (and every block's bounds);
        specontext keeps everything (plus its retrieval keys, `bounds_ratio` too) and reads the fraction."""
        share = 1.0 if self.fraction is None else self.fraction
        if self.kv_policy in ("quest", "specontext"):
            return format_ratio + bounds_ratio, format_ratio * share
        kept = format_ratio * (share if self.kv_policy in EVICTING else 1.0)
        return kept, format_ratio * share

    def block_size(self, block_size: int | None) -> int | None:
        """The engine's block size for this method: KIVI quantises keys in groups of 32 tokens, so its
        blocks must hold a multiple of 32; where `block_size` (the evaluation's; None: the engine's
        default, 16) is not one, a KIVI method pages in blocks of 32. Paging does not change what
        attention computes, so the other methods keep `block_size`."""
        if self.kv_cache_dtype in KIVI_CACHE_DTYPES and (block_size is None or block_size % KIVI_BLOCK_SIZE):
            return KIVI_BLOCK_SIZE
        return block_size

    def engine_args(self, sink_tokens: int, window: int | None, block_size: int | None = None) -> dict[str, Any]:
        """Engine keyword arguments: the format (and its block size, `block_size`), and with a policy that
        policy with its smallest valid budget (the default of requests without their own; the evaluation
        gives each its own)."""
        args: dict[str, Any] = {"kv_cache_dtype": self.kv_cache_dtype, "kv_policy": self.kv_policy,
                                "kv_budget": None, "block_size": self.block_size(block_size)}
        if self.kv_policy != "none":
            args["kv_budget"] = min_kv_budget(self.kv_policy, sink_tokens, window)
        return args


def _fraction_text(value: float | None) -> str:
    """Short (`0.25`, not `0.250`) yet exact: two different fractions never share a name or folder."""
    short = format(value, "g")
    return short if float(short) == value else repr(value)


def parse_method(text: str) -> KVMethod:
    """One entry; ValueError with the entry and the expected syntax when it is not one."""
    entry = text.strip()
    fmt, plus, rest = entry.partition("+")
    if not plus:
        fmt, rest = ("", entry) if "@" in entry or entry in _POLICIES else (entry, "")
    if fmt and fmt not in KV_CACHE_DTYPES:
        known = ", ".join(KV_CACHE_DTYPES)
        hint = f"; put the format first: {_SYNTAX}" if fmt in _POLICIES and plus else ""
        raise ValueError(f"{entry!r}: unknown format {fmt!r} (formats: {known}; policies: "
                         f"{', '.join(_POLICIES)}){hint}")
    if not rest:
        if plus:
            raise ValueError(f"{entry!r}: nothing after '+'; expected {_SYNTAX}")
        return KVMethod(kv_cache_dtype=fmt)
    policy, at, value = rest.partition("@")
    if policy in KV_CACHE_DTYPES:
        raise ValueError(f"{entry!r}: {policy} is a KV-cache format, not a policy; expected {_SYNTAX}")
    if policy == "none":
        raise ValueError(f"{entry!r}: policy none keeps all KV and takes no fraction; give the format alone")
    if policy not in _POLICIES:
        raise ValueError(f"{entry!r}: unknown format or policy {policy!r} (formats: {', '.join(KV_CACHE_DTYPES)}; "
                         f"policies: {', '.join(_POLICIES)})")
    if not at:
        raise ValueError(f"{entry!r}: {policy} needs a budget fraction, e.g. {policy}@0.25 (0 < F <= 1)")
    try:
        fraction = float(value)
        check_fraction(fraction, "the budget fraction")
    except ValueError:
        raise ValueError(f"{entry!r}: the budget fraction must be a number in (0, 1], got {value!r}") from None
    return KVMethod(kv_cache_dtype=fmt or "auto", kv_policy=policy, fraction=fraction)


def parse_methods(entries: list[str] | tuple[str, ...]) -> list[KVMethod]:
    """Every entry, or one ValueError listing each bad or repeated entry."""
    methods, errors, seen = [], [], {}
    for text in entries:
        try:
            method = parse_method(text)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if method in seen:
            errors.append(f"{text.strip()!r} repeats {seen[method]!r} ({method.name})")
            continue
        seen[method] = text.strip()
        methods.append(method)
    if errors:
        raise ValueError("; ".join(errors))
    if not methods:
        raise ValueError(f"no entries; expected {_SYNTAX}")
    return methods
