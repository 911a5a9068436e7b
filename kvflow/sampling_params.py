"""Per-request sampling parameters.

`SamplingParams` is the user-facing description of how one request is decoded.
It is validated eagerly (at construction *and* on assignment) so that a bad
value is reported to the caller with a clear message instead of surfacing as a
NaN or an index error deep inside a batched engine step.

Every invalid value raises ``ValueError`` (pydantic's ``ValidationError`` is a
subclass) whose text names the field and its allowed range, e.g.
``"top_p must be in (0, 1], got 1.5"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

# Temperatures below this are treated as greedy: dividing logits by a
# near-zero temperature only risks overflow and is argmax in all but name.
SAMPLING_EPS: float = 1e-5

# Top logprobs are materialised per generated token; cap them like the OpenAI API.
MAX_LOGPROBS: int = 20

_INT64_MAX: int = 2**63 - 1
_SEED_MIN: int = -(2**63)  # torch.Generator.manual_seed accepts [-2**63, 2**64)
_SEED_MAX: int = 2**64 - 1


def _in_closed(lo: float, hi: float) -> Callable[[Any], bool]:
    # Written as `lo <= v <= hi` so NaN (all comparisons False) is rejected.
    return lambda v: lo <= v <= hi


# field name -> (human description of the allowed values, predicate on the
# value *after* pydantic's type coercion).  One table keeps the messages and
# the checks from drifting apart.
_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "n": ("an integer >= 1", lambda v: v >= 1),
    "temperature": (
        "a finite number >= 0 (0 means greedy)",
        lambda v: math.isfinite(v) and v >= 0,
    ),
    # The sampler holds top_k in an int64 tensor; any k past the vocabulary keeps every token.
    "top_k": ("0 or -1 (disabled) or an integer >= 1 (at most 2**63 - 1)", lambda v: -1 <= v <= _INT64_MAX),
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "min_p": ("in [0, 1]", _in_closed(0.0, 1.0)),
    "seed": (
        f"None or an integer in [{_SEED_MIN}, {_SEED_MAX}]",
        lambda v: v is None or _SEED_MIN <= v <= _SEED_MAX,
    ),
    "presence_penalty": ("in [-2, 2]", _in_closed(-2.0, 2.0)),
    "frequency_penalty": ("in [-2, 2]", _in_closed(-2.0, 2.0)),
    "repetition_penalty": (
        "a finite number > 0 (1 disables it)",
        lambda v: math.isfinite(v) and v > 0,
    ),
    "stop": (
        "a list of non-empty strings (a single string or None is also accepted)",
        lambda v: all(len(s) > 0 for s in v),
    ),
    "stop_token_ids": (
        "a list of integers >= 0 (None is also accepted)",
        lambda v: all(t >= 0 for t in v),
    ),
    "max_tokens": (
        "None (until the context is full) or an integer >= 1 (0 only with prompt_logprobs: score the prompt, "
        "generate nothing)",
        lambda v: v is None or v >= 0,
    ),
    "min_tokens": ("an integer >= 0", lambda v: v >= 0),
    "ignore_eos": ("a bool", lambda v: True),
    "logprobs": (f"None or an integer in [0, {MAX_LOGPROBS}]", lambda v: v is None or 0 <= v <= MAX_LOGPROBS),
    "prompt_logprobs": (
        f"None or an integer in [0, {MAX_LOGPROBS}]",
        lambda v: v is None or 0 <= v <= MAX_LOGPROBS,
    ),
    "skip_special_tokens": ("a bool", lambda v: True),
    "include_stop_str_in_output": ("a bool", lambda v: True),
    # Names are checked by the engine against its policies (kvflow.config.KV_POLICIES) on arrival.
    "kv_policy": ("None or a KV policy name (none, streaming, h2o, snapkv, quest, specontext)",
                  lambda v: v is None or v != ""),
    "kv_budget": ("None or an integer >= 1 (tokens kept or read)", lambda v: v is None or v >= 1),
    "speculative": ("a bool", lambda v: True),
}

# Numeric fields where a bool must not be silently read as 0/1.
_NUMERIC_FIELDS: frozenset[str] = frozenset(
    {
        "n",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "max_tokens",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "kv_budget",
    }
)


def _check_prompt_only(name: str, value: Any, others: dict[str, Any]) -> None:
    """``max_tokens=0`` asks for the prompt's logprobs and no output (vLLM's and the legacy OpenAI API's
    ``echo`` with ``max_tokens: 0``, which lm-eval's loglikelihood sends); without ``prompt_logprobs``
    such a request would compute nothing anyone reads, so it is refused as a likely mistake.

    Checked on both fields, like ``_check_min_le_max``: at construction ``prompt_logprobs`` precedes
    ``max_tokens`` (so ``max_tokens`` sees it and the error names it); on assignment ``others`` holds
    every other field.
    """
    if name == "max_tokens":
        max_tokens, prompt_logprobs = value, others.get("prompt_logprobs")
        known = "prompt_logprobs" in others
    else:
        max_tokens, prompt_logprobs = others.get("max_tokens"), value
        known = "max_tokens" in others
    if not known or max_tokens != 0 or prompt_logprobs is not None:
        return
    if name == "max_tokens":
        raise ValueError(f"max_tokens must be {_RULES['max_tokens'][0]}, got max_tokens=0 with prompt_logprobs=None")
    raise ValueError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] while max_tokens is 0 "
                     "(a request that only scores its prompt), got None")


def _check_min_le_max(name: str, value: int | None, others: dict[str, Any]) -> None:
    """A request cannot be forced to emit more tokens than it may emit.

    Done in the field validator (not a model validator) because pydantic keeps
    an assignment that a model-level ``after`` validator rejects, which would
    leave the object invalid after a failed ``params.min_tokens = ...``.
    ``others`` holds the already-validated fields (at construction
    ``max_tokens`` precedes ``min_tokens``; on assignment it holds every other
    field).
    """
    if name == "min_tokens":
        min_tokens, max_tokens = value, others.get("max_tokens")
    else:
        min_tokens, max_tokens = others.get("min_tokens"), value
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(
            f"min_tokens must be <= max_tokens (min_tokens in [0, {max_tokens}]), "
            f"got min_tokens={min_tokens}, max_tokens={max_tokens}"
        )


class SamplingParams(BaseModel):
    """How to decode one request (vLLM/OpenAI-compatible semantics).

    ``top_k`` of ``-1`` is normalised to ``0`` (disabled) so the sampler only
    has one sentinel to handle.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    # (prompt_logprobs precedes max_tokens so that, at construction, max_tokens' check sees it.)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # 0: no output, only the prompt's logprobs (needs prompt_logprobs); the engine skips sampling.
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # This request's KV policy and budget instead of the engine's (`--kv-policy`, `--kv-budget`).
    kv_policy: str | None = None
    kv_budget: int | None = None
    # False: this request is never speculated on, even on an engine with speculative decoding.
    speculative: bool = True

    @field_validator("*", mode="wrap")
    @classmethod
    def _validate_field(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """Coerce with pydantic, then range-check, always with one clear message."""
        name = info.field_name
        assert name is not None
        desc, ok = _RULES[name]
        message = f"{name} must be {desc}, got {value!r}"
        if name in _NUMERIC_FIELDS and isinstance(value, bool):
            raise ValueError(message)
        if name == "stop" and isinstance(value, str):
            value = [value]
        if name in ("stop", "stop_token_ids") and value is None:
            value = []
        try:
            coerced = handler(value)
        except ValidationError:
            raise ValueError(message) from None
        if name == "stop_token_ids" and any(isinstance(t, bool) for t in value):
            raise ValueError(message)
        if not ok(coerced):
            raise ValueError(message)
        if name in ("min_tokens", "max_tokens"):
            _check_min_le_max(name, coerced, info.data)
        if name in ("max_tokens", "prompt_logprobs"):
            _check_prompt_only(name, coerced, info.data)
        if name == "top_k" and coerced == -1:
            return 0
        return coerced

    @property
    def prompt_only(self) -> bool:
        """True for ``max_tokens=0``: the request scores its prompt (``prompt_logprobs``) and generates nothing."""
        return self.max_tokens == 0

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature ~0 or top_k == 1)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1
