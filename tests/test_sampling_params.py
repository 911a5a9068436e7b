"""SamplingParams: every field validated with a message naming it and its range."""

from __future__ import annotations

from typing import Any

import pytest

from kvflow.sampling_params import SamplingParams

# --------------------------------------------------------------------------
# SamplingParams validation
# --------------------------------------------------------------------------

# (field, invalid value, substring describing the allowed range)
INVALID_VALUES: list[tuple[str, Any, str]] = [
    ("n", 0, ">= 1"),
    ("n", -3, ">= 1"),
    ("n", 1.5, ">= 1"),
    ("n", True, ">= 1"),
    ("n", "many", ">= 1"),
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("temperature", float("inf"), ">= 0"),
    ("temperature", "hot", ">= 0"),
    ("top_k", -2, ">= 1"),
    ("top_k", 2.5, ">= 1"),
    ("top_k", 2**70, "at most 2**63 - 1"),  # would overflow the sampler's int64 tensor
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", -0.5, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_p", float("nan"), "(0, 1]"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.01, "[0, 1]"),
    ("min_p", float("nan"), "[0, 1]"),
    ("seed", 1.5, "integer in"),
    ("seed", 2**64, "integer in"),
    ("seed", -(2**63) - 1, "integer in"),
    ("presence_penalty", 2.01, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("presence_penalty", float("nan"), "[-2, 2]"),
    ("frequency_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", -3.0, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("repetition_penalty", float("inf"), "> 0"),
    ("stop", [""], "non-empty strings"),
    ("stop", "", "non-empty strings"),
    ("stop", ["ok", ""], "non-empty strings"),
    ("stop", [1], "non-empty strings"),
    ("stop_token_ids", [-1], ">= 0"),
    ("stop_token_ids", [1, -5], ">= 0"),
    ("stop_token_ids", ["x"], ">= 0"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", -1, ">= 1"),
    ("min_tokens", -1, ">= 0"),
    ("ignore_eos", "maybe", "bool"),
    ("logprobs", -1, "[0, 20]"),
    ("logprobs", 21, "[0, 20]"),
    ("prompt_logprobs", -1, "[0, 20]"),
    ("prompt_logprobs", 21, "[0, 20]"),
    ("skip_special_tokens", "nope", "bool"),
    ("include_stop_str_in_output", [], "bool"),
    ("kv_policy", "", "KV policy name"),
    ("kv_policy", 3, "KV policy name"),
    ("kv_budget", 0, ">= 1"),
    ("kv_budget", True, ">= 1"),
    ("speculative", "maybe", "bool"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), INVALID_VALUES)
def test_invalid_value_raises_with_field_and_range(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as exc:
        SamplingParams(**{field: value})
    msg = str(exc.value)
    assert f"{field} must be" in msg
    assert allowed in msg


@pytest.mark.parametrize(("field", "value", "allowed"), INVALID_VALUES)
def test_invalid_assignment_raises_and_keeps_old_value(field: str, value: Any, allowed: str) -> None:
    params = SamplingParams()
    before = getattr(params, field)
    with pytest.raises(ValueError) as exc:
        setattr(params, field, value)
    assert f"{field} must be" in str(exc.value)
    assert allowed in str(exc.value)
    assert getattr(params, field) == before


def test_every_field_has_an_invalid_case() -> None:
    assert {f for f, _, _ in INVALID_VALUES} == set(SamplingParams.model_fields)


def test_unknown_key_raises_naming_the_key() -> None:
    with pytest.raises(ValueError, match="best_of_typo"):
        SamplingParams(best_of_typo=2)
    params = SamplingParams()
    with pytest.raises(ValueError, match="another_unknown"):
        params.another_unknown = 1


def test_min_tokens_must_not_exceed_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens") as exc:
        SamplingParams(min_tokens=5, max_tokens=3)
    assert "[0, 3]" in str(exc.value)
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5
    assert SamplingParams(min_tokens=500, max_tokens=None).min_tokens == 500

    params = SamplingParams(min_tokens=3, max_tokens=10)
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        params.max_tokens = 2
    assert params.max_tokens == 10
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        params.min_tokens = 11
    assert params.min_tokens == 3
    params.max_tokens = None
    params.min_tokens = 1000
    assert params.min_tokens == 1000


def test_max_tokens_zero_only_scores_the_prompt() -> None:
    """max_tokens=0 is a prompt-logprobs-only request (echo with max_tokens 0); alone it is a mistake."""
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    assert params.prompt_only and not SamplingParams().prompt_only
    with pytest.raises(ValueError, match=r"max_tokens must be .*>= 1 \(0 only with prompt_logprobs") as exc:
        SamplingParams(max_tokens=0)
    assert exc.value.errors()[0]["loc"] == ("max_tokens",)
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(max_tokens=0, prompt_logprobs=1, min_tokens=1)
    # On assignment too, from either side, and a refused assignment changes nothing.
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer in .* while max_tokens is 0"):
        params.prompt_logprobs = None
    assert params.prompt_logprobs == 0
    other = SamplingParams()
    with pytest.raises(ValueError, match="max_tokens must be"):
        other.max_tokens = 0
    assert other.max_tokens == 16
    other.prompt_logprobs = 5
    other.max_tokens = 0
    assert other.prompt_only


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (1, 1.0, 0, 1.0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.max_tokens, p.min_tokens, p.ignore_eos) == (16, 0, False)
    assert (p.logprobs, p.prompt_logprobs) == (None, None)
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    # Mutable defaults are not shared between instances.
    p.stop.append("x")
    assert SamplingParams().stop == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 1},
        {"temperature": 0.0},
        {"temperature": 1e-9},
        {"temperature": 100.0},
        {"top_k": 0},
        {"top_k": 1},
        {"top_k": 100000},
        {"top_p": 1e-6},
        {"top_p": 1.0},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"seed": 0},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"presence_penalty": 2.0, "frequency_penalty": -2.0},
        {"repetition_penalty": 1e-3},
        {"stop_token_ids": [0, 7]},
        {"max_tokens": 1},
        {"max_tokens": None},
        {"min_tokens": 0, "max_tokens": 1},
        {"logprobs": 0, "prompt_logprobs": 0},
        {"logprobs": 20, "prompt_logprobs": 20},
        {"ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True},
    ],
)
def test_valid_edge_values_accepted(kwargs: dict[str, Any]) -> None:
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        if key != "top_k":
            assert getattr(params, key) == value


def test_top_k_minus_one_normalised_to_zero() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    params = SamplingParams(top_k=5)
    params.top_k = -1
    assert params.top_k == 0


def test_stop_accepts_str_and_none() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    params = SamplingParams()
    params.stop = "END"
    assert params.stop == ["END"]


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert not SamplingParams(temperature=0.8).greedy
    assert not SamplingParams(temperature=0.8, top_k=2).greedy


