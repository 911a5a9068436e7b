"""``multi-turn`` end to end against a stub server whose delays and answers are known.

The stub answers ``max_tokens`` tokens as `` w0 w1 ...``, so each turn's prompt is predictable to
the character; its timeline (arrival and end of every request on the server's clock) checks that a
session's turns never overlap, while sessions do.
"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from kvflow.bench.serve.arrivals import arrival_offsets
from kvflow.bench.serve.config import ServeBenchConfig
from kvflow.bench.serve.runner import build_session_plans, load_tokenizer, run
from kvflow.bench.serve.sessions import SessionPlan
from kvflow.cli import main as cli_main
from tests.bench.serve.multi_turn_stub import Received, RecordingStub, generated
from tests.tokenizer_utils import make_tokenizer

FIRST, USER, OUT = 20, 5, 4  # first-turn tokens (= words), user tokens per later turn, output tokens


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("multi_turn_runs_tok")
    make_tokenizer(path, vocab_size=512)
    return path


def _config(stub: RecordingStub, tok_dir: Path, **kw) -> ServeBenchConfig:
    base = {"base_url": stub.base_url, "tokenizer": str(tok_dir), "progress": False, "result_dir": None,
            "dataset": "multi-turn", "num_sessions": 3, "num_turns": 4, "first_turn_len": FIRST,
            "turn_input_len": USER, "random_output_len": OUT}
    base.update(kw)
    return ServeBenchConfig(**base)


def _quiet(msg: str) -> None:
    pass


def _by_session(plans: list[SessionPlan], timeline: list[Received]) -> dict[int, list[Received]]:
    """The stub's requests per session in arrival order (the probe matches no session)."""
    out: dict[int, list[Received]] = {p.index: [] for p in plans}
    for entry in timeline:
        owners = [p.index for p in plans if entry.prompt.startswith(p.first.text)]
        assert len(owners) <= 1
        if owners:
            out[owners[0]].append(entry)
    return out


def test_turns_follow_each_answer_and_resend_the_history(tok_dir: Path) -> None:
    with RecordingStub(ttft=lambda w, m: 0.03, itl=lambda w, m: 0.005) as stub:
        cfg = _config(stub, tok_dir)
        doc = run(cfg, _quiet)
        timeline = list(stub.timeline)
        max_active = stub.max_active
    plans, _, _ = build_session_plans(cfg, load_tokenizer(str(tok_dir)))
    sessions = _by_session(plans, timeline)
    for plan in plans:
        entries = sessions[plan.index]
        assert len(entries) == 4
        for k in range(1, 4):  # entries[k] is turn k + 1
            prev, cur = entries[k - 1], entries[k]
            # sent only after the server handed out turn k's last chunk
            assert prev.last_chunk is not None and cur.received > prev.last_chunk
            assert cur.prompt == prev.prompt + generated(OUT) + " " + plan.user_turns[k - 1].text
            assert cur.body["max_tokens"] == plan.output_lens[k] == OUT
            assert cur.body["ignore_eos"] is True and cur.body["temperature"] == 0.0
        assert entries[0].prompt == plan.first.text
    # all three sessions were in flight together, never two turns of one session
    assert max_active == 3
    reqs = doc["requests"]
    assert [(r["session"], r["turn"]) for r in reqs] == [(s, t) for s in range(3) for t in range(1, 5)]
    assert all(r["success"] for r in reqs)
    # the client's prompt length estimate agrees with the server's count: 20, 29, 38, 47 words
    assert [r["prompt_tokens"] for r in reqs[:4]] == [FIRST + k * (OUT + USER) for k in range(4)]
    assert all(r["prompt_len"] == r["prompt_tokens"] for r in reqs)
    for s in range(3):
        turns = reqs[4 * s: 4 * s + 4]
        for prev, cur in zip(turns, turns[1:]):
            assert cur["start_s"] >= prev["start_s"] + prev["e2e_s"]
            assert cur["arrival_s"] >= prev["start_s"] + prev["e2e_s"]
    m = doc["summary"]["multi_turn"]
    assert (m["sessions"], m["sessions_completed"], m["turns"], m["turns_completed"]) == (3, 3, 12, 12)
    assert m["mean_prompt_tokens_by_turn"] == [20.0, 29.0, 38.0, 47.0]
    assert m["mean_prompt_tokens"] == pytest.approx(33.5)
    assert doc["summary"]["total_output_tokens"] == 12 * OUT


def test_chat_sessions_alternate_user_and_assistant_messages(tok_dir: Path) -> None:
    with RecordingStub(ttft=lambda w, m: 0.01, itl=lambda w, m: 0.002) as stub:
        cfg = _config(stub, tok_dir, endpoint="/v1/chat/completions", num_sessions=2, num_turns=3)
        doc = run(cfg, _quiet)
        timeline = list(stub.timeline)
    plans, _, _ = build_session_plans(cfg, load_tokenizer(str(tok_dir)))
    for plan in plans:
        last = _by_session(plans, timeline)[plan.index][-1].body
        assert last["max_completion_tokens"] == OUT
        assert last["messages"] == [
            {"role": "user", "content": plan.first.text},
            {"role": "assistant", "content": generated(OUT)},
            {"role": "user", "content": plan.user_turns[0].text},
            {"role": "assistant", "content": generated(OUT)},
            {"role": "user", "content": plan.user_turns[1].text},
        ]
    assert doc["summary"]["multi_turn"]["turns_completed"] == 6


def test_max_concurrency_counts_sessions_and_the_rate_spaces_their_starts(tok_dir: Path) -> None:
    rate = 40.0
    with RecordingStub(ttft=lambda w, m: 0.02, itl=lambda w, m: 0.003) as stub:
        doc = run(_config(stub, tok_dir, num_sessions=5, num_turns=3, max_concurrency=2, request_rate=rate,
                          seed=3), _quiet)
        max_active = stub.max_active
    assert max_active == 2
    reqs = doc["requests"]
    firsts = [r for r in reqs if r["turn"] == 1]
    # turn 1 is due at the session's Poisson start, from the seed's arrival stream
    expected = arrival_offsets(5, rate, 1.0, np.random.default_rng([3, 1]))
    np.testing.assert_allclose([r["arrival_s"] for r in firsts], expected, atol=1e-9)
    assert all(r["start_s"] >= r["arrival_s"] - 1e-3 for r in firsts)
    # a session holds its slot from its first send to its last answer: never more than 2 alive
    life = []
    for s in range(5):
        turns = [r for r in reqs if r["session"] == s]
        life.append((turns[0]["start_s"], turns[-1]["start_s"] + turns[-1]["e2e_s"]))
    assert max(sum(1 for a, b in life if a <= t < b) for t, _ in life) == 2
    assert doc["rate_label"] == "40" and doc["offered_rate"] == pytest.approx(4 / expected[-1])


def test_ttft_of_later_turns_is_reported_apart_from_first_turns(tok_dir: Path) -> None:
    # first turns (20 words) are slow to first token, later turns (>= 29 words) fast: a cache hit
    with RecordingStub(ttft=lambda w, m: 0.15 if w <= FIRST else 0.02, itl=lambda w, m: 0.004) as stub:
        doc = run(_config(stub, tok_dir, num_turns=3), _quiet)
    m = doc["summary"]["multi_turn"]
    first, later = m["ttft_ms_first_turn"], m["ttft_ms_later_turns"]
    assert 148 <= first["p50"] <= 230 and 148 <= first["mean"] <= 230
    assert 18 <= later["p50"] <= 60 and later["p99"] < first["p50"]
    # E2E = TTFT + 3 gaps of 4 ms
    assert 160 <= m["e2e_ms_first_turn"]["mean"] <= 260 and 30 <= m["e2e_ms_later_turns"]["mean"] <= 120
    assert (m["sessions_completed"], m["turns_completed"]) == (3, 9)


def test_a_failed_turn_ends_its_session(tok_dir: Path) -> None:
    # turn 3 has 38 words: it fails, and turn 4 is never sent
    with RecordingStub(ttft=lambda w, m: 0.01, itl=lambda w, m: 0.002, fail=lambda w, m: w > 30) as stub:
        doc = run(_config(stub, tok_dir), _quiet)
        sent = len(stub.timeline)
    assert sent == 1 + 3 * 3  # probe + turns 1-3 of each session
    s = doc["summary"]
    m = s["multi_turn"]
    assert (m["sessions"], m["sessions_completed"], m["turns"], m["turns_completed"]) == (3, 0, 12, 6)
    assert s["completed"] == 6 and s["failed"] == 6
    assert [r["success"] for r in doc["requests"][:4]] == [True, True, False, False]
    assert doc["requests"][3]["error"] == "not sent: turn 3 of the session failed"
    assert s["errors"]["not sent: turn 3 of the session failed"] == 3
    assert sum(n for msg, n in s["errors"].items() if msg.startswith("HTTP 500")) == 3
    assert m["mean_prompt_tokens_by_turn"][:2] == [20.0, 29.0] and math.isnan(m["mean_prompt_tokens_by_turn"][2])


def test_cli_prints_the_per_turn_table(tok_dir: Path) -> None:
    out = io.StringIO()
    with RecordingStub(ttft=lambda w, m: 0.01, itl=lambda w, m: 0.002, model_root=str(tok_dir)) as stub:
        with redirect_stdout(out):
            rc = cli_main(["bench", "serve", "--base-url", stub.base_url, "--dataset", "multi-turn",
                           "--num-sessions", "2", "--num-turns", "2", "--first-turn-len", "12",
                           "--turn-input-len", "3", "--random-output-len", "2", "--no-save", "--disable-tqdm"])
    assert rc == 0
    lines = out.getvalue().splitlines()
    assert "Dataset: multi-turn, request rate: inf, max concurrency: none" in lines
    assert any(line.startswith("Turns completed") and line.endswith("4 / 4") for line in lines)
    assert any(line.split()[:3] == ["Mean", "prompt", "tokens,"] and line.endswith("17.0") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.split() == ["turn", "1", "turns", ">=", "2"])
    assert lines[header + 1].split()[:3] == ["Mean", "TTFT", "(ms)"]


def test_think_time_spaces_a_session_turns_and_not_its_ttft(tok_dir: Path) -> None:
    with RecordingStub(ttft=lambda w, m: 0.01, itl=lambda w, m: 0.002) as stub:
        cfg = _config(stub, tok_dir, num_sessions=2, num_turns=3, think_time=0.15)
        doc = run(cfg, _quiet)
        timeline = list(stub.timeline)
    plans, _, _ = build_session_plans(cfg, load_tokenizer(str(tok_dir)))
    sessions = _by_session(plans, timeline)
    for plan in plans:
        assert len(plan.think_s) == 2
        entries = sessions[plan.index]
        for k in (1, 2):
            assert entries[k].received - entries[k - 1].last_chunk >= plan.think_s[k - 1] - 0.005
    later = [r for r in doc["requests"] if r["turn"] > 1]
    assert all(r["ttft_s"] < 0.1 for r in later)  # the wait is the user's, not the server's
