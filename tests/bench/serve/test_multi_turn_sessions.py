"""``multi-turn`` without a server: session plans, turn chaining, the per-turn summary, config, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvflow.bench.serve.client import RequestResult, Target, build_payload
from kvflow.bench.serve.config import ServeBenchConfig
from kvflow.bench.serve.metrics import summarize
from kvflow.bench.serve.prompts import PromptBuilder
from kvflow.bench.serve.report import format_table
from kvflow.bench.serve.runner import build_requests, build_session_plans, load_tokenizer
from kvflow.bench.serve.sessions import build_sessions, next_turn
from kvflow.cli import build_parser
from kvflow.cli.bench_serve import config_from_args
from tests.tokenizer_utils import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("multi_turn_tok")
    make_tokenizer(path, vocab_size=512)
    return load_tokenizer(str(path))


def _plans(tokenizer, seed: int = 0, **kw):
    args = {"num_sessions": 3, "num_turns": 4, "first_turn_len": 40, "turn_input_len": 7,
            "output_len": 10, "range_ratio": 0.5}
    args.update(kw)
    builder = PromptBuilder(tokenizer, np.random.default_rng(seed))
    return builder, build_sessions(builder, rng=np.random.default_rng(seed + 1), **args)


# --- plans and turn chaining ----------------------------------------------------------------------


def test_session_plans_have_exact_lengths_and_are_seeded(tokenizer) -> None:
    builder, plans = _plans(tokenizer)
    assert [p.index for p in plans] == [0, 1, 2] and all(p.num_turns == 4 for p in plans)
    for p in plans:
        assert p.first.num_tokens == 40 == builder.count(p.first.text)
        assert len(p.user_turns) == 3
        # a later turn's user words are 7 tokens where they sit: after a space
        assert all(u.num_tokens == 7 == builder.count(" " + u.text) for u in p.user_turns)
        assert all(5 <= n <= 15 for n in p.output_lens)
    assert builder.inexact == 0
    assert len({p.first.text for p in plans}) == 3
    _, again = _plans(tokenizer)
    assert again == plans
    _, other = _plans(tokenizer, seed=5)
    assert other[0].first.text != plans[0].first.text


def test_next_turn_resends_prompt_answer_and_new_user_words(tokenizer) -> None:
    _, plans = _plans(tokenizer, num_turns=3)
    plan = plans[1]
    t1 = plan.first_request()
    assert (t1.prompt, t1.prompt_len, t1.output_len) == (plan.first.text, 40, plan.output_lens[0])
    assert t1.messages == (("user", plan.first.text),)
    t2 = next_turn(plan, t1, " the answer", 2, turn=2)
    assert t2.prompt == plan.first.text + " the answer " + plan.user_turns[0].text
    assert t2.prompt_len == 40 + 2 + 7 and t2.output_len == plan.output_lens[1]
    assert t2.messages == (("user", plan.first.text), ("assistant", " the answer"),
                           ("user", plan.user_turns[0].text))
    t3 = next_turn(plan, t2, "second", 1, turn=3)
    assert t3.prompt == t2.prompt + "second " + plan.user_turns[1].text
    assert t3.prompt_len == 49 + 1 + 7
    assert [role for role, _ in t3.messages] == ["user", "assistant", "user", "assistant", "user"]
    with pytest.raises(ValueError, match="turn must be in"):
        next_turn(plan, t3, "x", 1, turn=4)


def test_payloads_carry_the_history_on_both_endpoints(tokenizer) -> None:
    _, plans = _plans(tokenizer, num_turns=2)
    t2 = next_turn(plans[0], plans[0].first_request(), " ok", 1, turn=2)
    chat = build_payload(Target(url="u", api="chat", model="m"), t2)
    assert chat["messages"] == [{"role": r, "content": c} for r, c in t2.messages]
    assert chat["max_completion_tokens"] == t2.output_len and chat["ignore_eos"] is True
    assert chat["temperature"] == 0.0
    comp = build_payload(Target(url="u", api="completions", model="m"), t2)
    assert comp["prompt"] == t2.prompt and "messages" not in comp and comp["max_tokens"] == t2.output_len


def test_session_plans_and_start_times_come_from_the_seed_only(tokenizer) -> None:
    cfg = ServeBenchConfig(dataset="multi-turn", num_sessions=5, num_turns=2, first_turn_len=30,
                           turn_input_len=5, random_output_len=4, request_rate=3.0, seed=11)
    plans, offsets, probe = build_session_plans(cfg, tokenizer)
    again, offsets_again, _ = build_session_plans(cfg, tokenizer)
    assert plans == again
    np.testing.assert_array_equal(offsets, offsets_again)
    assert len(plans) == len(offsets) == 5 and offsets[0] == 0.0 and np.all(np.diff(offsets) > 0)
    # the probe is a short prompt of its own, not a session's document (which must reach turn 1 uncached)
    assert probe.prompt_len == 4 == len(tokenizer.encode(probe.prompt, add_special_tokens=False))
    assert all(probe.prompt not in p.first.text for p in plans)
    with pytest.raises(ValueError, match="build_session_plans"):
        build_requests(cfg, tokenizer)


# --- the per-turn summary ---------------------------------------------------------------------


def _turn(session: int, turn: int, ttft: float, e2e: float, prompt: int, ok: bool = True) -> RequestResult:
    return RequestResult(prompt_len=prompt, output_len=4, success=ok, prompt_tokens=prompt if ok else None,
                         output_tokens=4 if ok else 0, ttft_s=ttft, e2e_s=e2e, session=session, turn=turn,
                         error="" if ok else "boom")


def test_ttft_and_e2e_are_split_between_first_and_later_turns() -> None:
    results = [
        _turn(0, 1, 0.100, 0.300, 100), _turn(0, 2, 0.010, 0.210, 120), _turn(0, 3, 0.020, 0.220, 140),
        _turn(1, 1, 0.200, 0.400, 100), _turn(1, 2, 0.030, 0.230, 120), _turn(1, 3, 0.040, 0.240, 140),
        _turn(2, 1, 0.300, 0.500, 100), _turn(2, 2, 0.0, 0.0, 0, ok=False), _turn(2, 3, 0.0, 0.0, 0, ok=False),
    ]
    s = summarize(results, duration_s=2.0, percentiles=(50, 90, 99))
    m = s["multi_turn"]
    assert (m["sessions"], m["sessions_completed"], m["turns"], m["turns_completed"]) == (3, 2, 9, 7)
    first, later = m["ttft_ms_first_turn"], m["ttft_ms_later_turns"]
    assert first["mean"] == pytest.approx(200.0) and first["p50"] == pytest.approx(200.0)
    assert first["p90"] == pytest.approx(280.0) and first["p99"] == pytest.approx(298.0)
    assert later["mean"] == pytest.approx(25.0) and later["p50"] == pytest.approx(25.0)
    assert later["p90"] == pytest.approx(37.0) and later["p99"] == pytest.approx(39.7)
    assert m["e2e_ms_first_turn"]["mean"] == pytest.approx(400.0)
    assert m["e2e_ms_later_turns"]["p50"] == pytest.approx(225.0)
    assert m["mean_prompt_tokens_by_turn"] == pytest.approx([100.0, 120.0, 140.0])
    assert m["mean_prompt_tokens"] == pytest.approx((300 + 240 + 280) / 7)
    assert m["output_throughput"] == pytest.approx(7 * 4 / 2.0) == s["output_throughput"]
    assert m["total_token_throughput"] == pytest.approx((820 + 28) / 2.0) == s["total_token_throughput"]
    # the overall TTFT pools all turns
    assert s["ttft_ms"]["mean"] == pytest.approx(1000 * (0.6 + 0.1) / 7)
    table = format_table({"label": "x", "model": "m", "dataset": "multi-turn", "rate_label": "inf",
                          "config": {}, "summary": s})
    assert "Multi-turn sessions" in table
    assert any(line.startswith("Sessions completed") and line.endswith("2 / 3") for line in table.splitlines())
    assert any(line.split()[:3] == ["P90", "TTFT", "(ms)"] and line.split()[3:] == ["280.00", "37.00"]
               for line in table.splitlines())
    assert any(line.split()[:3] == ["Mean", "E2E", "(ms)"] and line.split()[3:] == ["400.00", "225.00"]
               for line in table.splitlines())


def test_single_dataset_results_have_no_multi_turn_section() -> None:
    one = RequestResult(prompt_len=5, output_len=2, success=True, output_tokens=2, ttft_s=0.1, e2e_s=0.2)
    s = summarize([one], 1.0)
    assert "multi_turn" not in s
    record = RequestResult(prompt_len=5, output_len=2, session=3, turn=2, generated_text="secret").to_dict()
    assert record["session"] == 3 and record["turn"] == 2 and "generated_text" not in record
    assert RequestResult(**{k: v for k, v in record.items() if k != "tpot_s"}).turn == 2  # sim reloads records


# --- config and CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,message", [
    ({"num_sessions": 0}, "--num-sessions must be >= 1, got 0"),
    ({"num_turns": 0}, "--num-turns must be >= 1, got 0"),
    ({"first_turn_len": -3}, "--first-turn-len must be >= 1, got -3"),
    ({"turn_input_len": 0}, "--turn-input-len must be >= 1, got 0"),
    ({"num_prompts": 10}, "--num-prompts does not apply"),
    ({"random_range_ratio": 1.0}, "--random-range-ratio must be in"),
])
def test_multi_turn_config_errors(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServeBenchConfig(dataset="multi-turn", **kw).validate()


def test_cli_parses_the_multi_turn_flags(tmp_path: Path) -> None:
    args = build_parser("bench").parse_args([
        "bench", "serve", "--dataset", "multi-turn", "--num-sessions", "6", "--num-turns", "3",
        "--first-turn-len", "200", "--turn-input-len", "32", "--random-output-len", "16",
        "--random-range-ratio", "0.25", "--max-concurrency", "2", "--request-rate", "1.5", "--no-save",
    ])
    cfg = config_from_args(args)
    assert (cfg.dataset, cfg.num_sessions, cfg.num_turns, cfg.first_turn_len, cfg.turn_input_len) == (
        "multi-turn", 6, 3, 200, 32)
    assert (cfg.random_output_len, cfg.random_range_ratio, cfg.max_concurrency, cfg.request_rate) == (16, 0.25, 2, 1.5)
    assert cfg.result_dir is None and cfg.num_prompts is None
    defaults = config_from_args(build_parser("bench").parse_args(["bench", "serve", "--dataset", "multi-turn"]))
    assert (defaults.num_sessions, defaults.num_turns, defaults.first_turn_len, defaults.turn_input_len) == (
        48, 4, 1536, 128)
    bad = build_parser("bench").parse_args(["bench", "serve", "--dataset", "multi-turn", "--num-turns", "0"])
    with pytest.raises(ValueError, match="--num-turns must be >= 1"):
        config_from_args(bad)


def test_think_times_are_seeded_and_leave_the_prompts_alone():
    import numpy as np

    from kvflow.bench.serve.sessions import SessionPlan, add_think_times

    plans = [SessionPlan(i, None, (), (4, 4, 4)) for i in range(3)]  # type: ignore[arg-type]
    assert add_think_times(plans, 0.0, np.random.default_rng(0)) == plans
    a = add_think_times(plans, 2.0, np.random.default_rng([0, 2]))
    b = add_think_times(plans, 2.0, np.random.default_rng([0, 2]))
    assert a == b and all(len(p.think_s) == 2 and all(t >= 0 for t in p.think_s) for p in a)
    assert [(p.index, p.output_lens) for p in a] == [(p.index, p.output_lens) for p in plans]
    means = add_think_times([SessionPlan(0, None, (), (1,) * 2001)], 2.0, np.random.default_rng(1))  # type: ignore[arg-type]
    assert abs(np.mean(means[0].think_s) - 2.0) < 0.2
