"""``kvflow bench serve``: arrivals, datasets, SSE parsing, timing, goodput, concurrency, outputs.

Timing tests run against ``serve_stub.StubServer``, an OpenAI-compatible streaming server whose
delays are known, so the client's measurements can be checked against the truth. Tolerances are
loose on the slow side only (the machine is shared; a busy CPU delays, it never speeds up).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kvflow.bench.serve.arrivals import arrival_offsets, offered_rate
from kvflow.bench.serve.client import RequestResult
from kvflow.bench.serve.config import ServeBenchConfig
from kvflow.bench.serve.datasets import (
    random_requests,
    sample_lengths,
    shared_prefix_requests,
    trace_requests,
)
from kvflow.bench.serve.metrics import parse_goodput, slo_checks, summarize
from kvflow.bench.serve.plots import plot_compare
from kvflow.bench.serve.prompts import PromptBuilder
from kvflow.bench.serve.report import format_table, load_result, save_result
from kvflow.bench.serve.runner import load_tokenizer, run
from kvflow.bench.serve.sse import SSEDecoder
from kvflow.bench.serve.trace import load_trace, trace_offsets
from kvflow.cli import main as cli_main
from tests.bench.serve_stub import StubServer
from tests.tokenizer_utils import make_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve_tok")
    make_tokenizer(path, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path):
    return load_tokenizer(str(tok_dir))


def _config(stub: StubServer, tok_dir: Path, **kw) -> ServeBenchConfig:
    base = {"base_url": stub.base_url, "tokenizer": str(tok_dir), "progress": False, "result_dir": None,
            "random_input_len": 8, "random_output_len": 4, "num_prompts": 8}
    base.update(kw)
    return ServeBenchConfig(**base)


def _quiet(msg: str) -> None:
    pass


# --- arrivals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (20.0, 0.25), (2.0, 4.0)])
def test_arrival_gaps_follow_the_requested_gamma_process(rate: float, burstiness: float) -> None:
    offsets = arrival_offsets(3000, rate, burstiness, np.random.default_rng(7))
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    gaps = np.diff(offsets)
    # The gaps are gamma(shape=burstiness, mean=1/rate); burstiness 1 is exponential (Poisson).
    ks = stats.kstest(gaps, stats.gamma(a=burstiness, scale=1.0 / (rate * burstiness)).cdf)
    assert ks.pvalue > 1e-3, ks
    if burstiness == 1.0:
        assert stats.kstest(gaps, stats.expon(scale=1.0 / rate).cdf).pvalue > 1e-3
    # Mean rate within 4 standard errors (CV of the gaps is 1/sqrt(burstiness)).
    se = (1.0 / rate) / math.sqrt(burstiness) / math.sqrt(len(gaps))
    assert abs(gaps.mean() - 1.0 / rate) < 4 * se
    assert offered_rate(offsets) == pytest.approx(rate, rel=4 * se * rate)


def test_arrivals_are_seeded_and_inf_sends_all_at_once() -> None:
    a = arrival_offsets(50, 3.0, 1.0, np.random.default_rng(1))
    b = arrival_offsets(50, 3.0, 1.0, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0)), np.zeros(5))
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0, 1.0, np.random.default_rng(0))


# --- trace ---------------------------------------------------------------------------------------


def _write_trace(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{c},{g}\n" for t, c, g in rows))
    return path


def test_trace_loader_replays_timestamps_and_lengths(tmp_path: Path, tokenizer) -> None:
    csv = _write_trace(tmp_path / "t.csv", [
        ("2023-11-16 18:17:03.9799600", 40, 10),
        ("2023-11-16 18:17:04.0319600", 3000, 8),   # prompt over the clip
        ("2023-11-16 18:17:05.4799600", 12, 500),   # output over the clip
        ("2023-11-16 18:17:04.9799600", 7, 0),      # out of order; zero output -> 1
    ])
    rows = load_trace(csv)
    assert [r.context_tokens for r in rows] == [40, 3000, 7, 12]
    np.testing.assert_allclose(trace_offsets(rows), [0.0, 0.052, 1.0, 1.5], atol=1e-9)
    np.testing.assert_allclose(trace_offsets(rows, time_scale=0.5), [0.0, 0.026, 0.5, 0.75], atol=1e-9)
    assert len(load_trace(csv, limit=2)) == 2
    builder = PromptBuilder(tokenizer, np.random.default_rng(0))
    reqs = trace_requests(builder, rows, max_input_len=100, max_output_len=64)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(40, 10), (100, 8), (7, 1), (12, 64)]
    assert [builder.count(r.prompt) for r in reqs] == [40, 100, 7, 12]


def test_trace_accepts_numeric_timestamps_and_rejects_bad_headers(tmp_path: Path) -> None:
    rows = load_trace(_write_trace(tmp_path / "n.csv", [("10.5", 5, 2), ("12.0", 6, 3)]))
    np.testing.assert_allclose(trace_offsets(rows), [0.0, 1.5])
    (tmp_path / "bad.csv").write_text("time,in,out\n1,2,3\n")
    with pytest.raises(ValueError, match="TIMESTAMP"):
        load_trace(tmp_path / "bad.csv")


# --- prompts and datasets ----------------------------------------------------------------------------


def test_random_dataset_prompts_have_exact_token_lengths(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, np.random.default_rng(3))
    for n in (1, 2, 3, 17, 64, 333):
        p = builder.build(n)
        assert p.num_tokens == n == len(tokenizer.encode(p.text, add_special_tokens=False))
    reqs = random_requests(builder, 40, input_len=50, output_len=20, range_ratio=0.5, rng=np.random.default_rng(4))
    lens = [r.prompt_len for r in reqs]
    assert all(builder.count(r.prompt) == r.prompt_len for r in reqs)
    assert min(lens) >= 25 and max(lens) <= 75 and len(set(lens)) > 5
    assert all(10 <= r.output_len <= 30 for r in reqs)
    assert builder.inexact == 0
    assert len({r.prompt for r in reqs}) == len(reqs)
    again = random_requests(PromptBuilder(tokenizer, np.random.default_rng(3)), 3, 10, 5, 0.0, np.random.default_rng(4))
    assert [r.prompt_len for r in again] == [10, 10, 10] and [r.output_len for r in again] == [5, 5, 5]


def test_sample_lengths_range() -> None:
    lens = sample_lengths(100, 0.2, 2000, np.random.default_rng(0))
    assert lens.min() == 80 and lens.max() == 120


def test_shared_prefix_dataset_shares_exact_prefix_tokens(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, np.random.default_rng(5))
    reqs = shared_prefix_requests(builder, 12, prefix_len=30, num_groups=3, suffix_len=10, output_len=4,
                                  range_ratio=0.0, rng=np.random.default_rng(6))
    assert sorted(r.group for r in reqs) == sorted([0, 1, 2] * 4)
    for r in reqs:
        assert r.prompt_len == 40 == builder.count(r.prompt)
    groups: dict[int, list[list[int]]] = {}
    for r in reqs:
        groups.setdefault(r.group, []).append(tokenizer.encode(r.prompt, add_special_tokens=False))
    heads = {g: {tuple(ids[:30]) for ids in members} for g, members in groups.items()}
    assert all(len(h) == 1 for h in heads.values())  # one prefix per group, token for token
    assert len({next(iter(h)) for h in heads.values()}) == 3  # and the groups differ


# --- SSE and metrics ----------------------------------------------------------------------------------------


def test_sse_decoder_handles_arbitrary_splits() -> None:
    stream = (b": comment\r\ndata: {\"a\": 1}\r\n\r\nevent: x\ndata: line1\ndata: line2\n\n"
              b"data: caf\xc3\xa9\n\ndata: [DONE]\n\n")
    expected = ['{"a": 1}', "line1\nline2", "café", "[DONE]"]
    assert SSEDecoder().feed(stream) == expected
    dec, out = SSEDecoder(), []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
    assert out == expected
    dec = SSEDecoder()
    assert dec.feed(b"data: tail") == [] and dec.flush() == ["tail"]


def _result(ttft: float, e2e: float, out: int, ok: bool = True) -> RequestResult:
    return RequestResult(prompt_len=10, output_len=out, success=ok, output_tokens=out if ok else 0,
                         ttft_s=ttft, e2e_s=e2e, itl_s=[(e2e - ttft) / max(out - 1, 1)] * (out - 1))


def test_goodput_counts_exactly_the_requests_meeting_every_slo() -> None:
    slos = parse_goodput(["ttft:100", "tpot:20"])
    assert slos == {"ttft": 100.0, "tpot": 20.0}
    results = [
        _result(0.050, 0.050 + 9 * 0.010, 10),  # both met
        _result(0.100, 0.100 + 9 * 0.0195, 10),  # TTFT exactly at its limit, TPOT just under
        _result(0.150, 0.150 + 9 * 0.010, 10),  # TTFT missed
        _result(0.050, 0.050 + 9 * 0.030, 10),  # TPOT missed
        _result(0.200, 0.200 + 9 * 0.030, 10),  # both missed
        _result(0.050, 0.050, 1),               # one token: no TPOT, meets it
        _result(0.010, 0.020, 5, ok=False),     # failed: meets nothing
    ]
    s = summarize(results, duration_s=2.0, slos_ms=slos)
    g = s["goodput"]
    assert g["good_requests"] == 3
    assert g["request_goodput"] == pytest.approx(1.5)
    assert g["attainment"] == pytest.approx({"ttft": 4 / 7, "tpot": 4 / 7, "all": 3 / 7})
    assert slo_checks(results[3], slos) == {"ttft": True, "tpot": False}
    assert s["completed"] == 6 and s["failed"] == 1
    assert s["tpot_ms"]["median"] == pytest.approx(19.5)  # of 10, 19.5, 10, 30, 30 (1-token: none)
    assert s["output_throughput"] == pytest.approx(51 / 2.0)
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])
    assert "Request goodput" in format_table({"label": "x", "model": "m", "dataset": "random", "rate_label": "1",
                                              "config": {}, "summary": s})


# --- end to end against the stub ----------------------------------------------------------------------------------


def test_measured_ttft_itl_tpot_match_the_servers_delays(tok_dir: Path) -> None:
    ttft, itl, n_out = 0.15, 0.03, 6
    with StubServer(ttft=lambda w, m: ttft, itl=lambda w, m: itl) as stub:
        doc = run(_config(stub, tok_dir, num_prompts=6, random_output_len=n_out, max_concurrency=3), _quiet)
        body = stub.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == n_out and body["model"] == "stub-model"
    reqs = doc["requests"]
    assert all(r["success"] for r in reqs) and all(r["output_tokens"] == n_out for r in reqs)
    assert all(r["prompt_tokens"] == r["prompt_len"] == 8 for r in reqs)
    for r in reqs:
        assert ttft - 0.005 <= r["ttft_s"] <= ttft + 0.1
        assert len(r["itl_s"]) == n_out - 1
        assert itl - 0.005 <= r["tpot_s"] <= itl + 0.03
        assert r["e2e_s"] == pytest.approx(r["ttft_s"] + sum(r["itl_s"]), abs=0.02)
    s = doc["summary"]
    assert itl - 0.005 <= s["itl_ms"]["median"] / 1000 <= itl + 0.02
    assert s["total_output_tokens"] == 6 * n_out


def test_goodput_and_trace_replay_end_to_end(tmp_path: Path, tok_dir: Path) -> None:
    # Short prompts (<= 20 tokens) are fast to first token; even output lengths decode fast;
    # output length 7 fails. SLOs sit far from both delays, so only the classes decide.
    rows = [(f"{100 + 0.05 * i:.3f}", 10 if i % 3 else 40, (4, 5, 6, 7)[i % 4]) for i in range(12)]
    csv = _write_trace(tmp_path / "trace.csv", rows)
    with StubServer(ttft=lambda w, m: 0.02 if w <= 20 else 0.30,
                    itl=lambda w, m: 0.005 if m % 2 == 0 else 0.08,
                    fail=lambda w, m: m == 7) as stub:
        doc = run(_config(stub, tok_dir, dataset="trace", trace_file=str(csv), trace_time_scale=2.0,
                          num_prompts=None, goodput_ms={"ttft": 150.0, "tpot": 40.0}), _quiet)
    reqs = doc["requests"]
    assert [(r["prompt_len"], r["output_len"]) for r in reqs] == [(c, g) for _, c, g in rows]
    expected_good = sum(1 for _, c, g in rows if c <= 20 and g % 2 == 0 and g != 7)
    g = doc["summary"]["goodput"]
    assert g["good_requests"] == expected_good == 4
    assert doc["summary"]["failed"] == 3
    assert g["attainment"]["all"] == pytest.approx(expected_good / len(rows))
    # Arrivals replay the trace's timestamps (scaled by 2): 0, 0.1, 0.2, ...
    np.testing.assert_allclose([r["arrival_s"] for r in reqs], [0.1 * i for i in range(12)], atol=1e-9)
    lateness = [r["start_s"] - r["arrival_s"] for r in reqs]
    assert min(lateness) >= -1e-3 and max(lateness) < 0.1
    assert doc["rate_label"] == "trace-x2"


def test_max_concurrency_is_never_exceeded(tok_dir: Path) -> None:
    with StubServer(ttft=lambda w, m: 0.03, itl=lambda w, m: 0.005) as stub:
        doc = run(_config(stub, tok_dir, num_prompts=16, max_concurrency=3, request_rate=math.inf), _quiet)
        assert stub.max_active == 3
    assert doc["summary"]["completed"] == 16
    starts = sorted((r["start_s"], r["start_s"] + r["e2e_s"]) for r in doc["requests"])
    in_flight = max(sum(1 for s, e in starts if s <= t < e) for t, _ in starts)
    assert in_flight <= 3


def test_chat_endpoint_and_ignore_eos_fallback(tok_dir: Path) -> None:
    with StubServer(ttft=lambda w, m: 0.1, itl=lambda w, m: 0.01, reject_ignore_eos=True) as stub:
        doc = run(_config(stub, tok_dir, endpoint="/v1/chat/completions", num_prompts=3), _quiet)
        bodies = stub.bodies
    assert doc["ignore_eos_sent"] is False
    assert "ignore_eos" not in bodies[-1] and bodies[-1]["max_completion_tokens"] == 4
    assert all(r["success"] for r in doc["requests"])
    # The role-only first chunk arrives at once; the first text 0.1 s later is the TTFT.
    assert all(r["ttft_s"] >= 0.095 for r in doc["requests"])


def test_cli_writes_json_and_png_and_compares_runs(tmp_path: Path, tok_dir: Path) -> None:
    out = tmp_path / "results"
    with StubServer(ttft=lambda w, m: 0.02, itl=lambda w, m: 0.005, model_root=str(tok_dir)) as stub:
        for label, rate in (("a", "inf"), ("b", "20")):
            assert cli_main([
                "bench", "serve", "--base-url", stub.base_url, "--num-prompts", "6",
                "--random-input-len", "12", "--random-output-len", "3", "--request-rate", rate,
                "--goodput", "ttft:500", "tpot:100", "--result-dir", str(out), "--label", label,
                "--disable-tqdm",
            ]) == 0  # no --tokenizer: found through /v1/models "root"
    files = sorted(p.name for p in out.iterdir())
    jsons = sorted(out.glob("*.json"))
    assert len(jsons) == 2, files
    assert len(list(out.glob("*-cdf.png"))) == 2 and len(list(out.glob("*-attainment.png"))) == 2, files
    doc = load_result(jsons[0])
    assert doc["label"] == "a" and doc["rate_label"] == "inf" and doc["request_rate"] == "inf"
    assert doc["summary"]["goodput"]["good_requests"] == 6
    assert len(doc["requests"]) == 6 and doc["tokenizer"] == str(tok_dir)
    json.loads(jsons[0].read_text())  # strict JSON (no NaN / Infinity)
    fig = tmp_path / "compare.png"
    assert cli_main(["bench", "serve-plot", *map(str, jsons), "--out", str(fig)]) == 0
    assert fig.stat().st_size > 10_000 and fig.read_bytes()[:4] == b"\x89PNG"


def test_result_round_trip_with_nan_and_plot_without_slos(tmp_path: Path) -> None:
    s = summarize([_result(0.01, 0.01, 1)], duration_s=1.0)
    assert math.isnan(s["tpot_ms"]["mean"])
    doc = {"kind": "kvflow-bench-serve", "label": "x", "dataset": "random", "rate_label": "inf", "model": "m",
           "summary": s, "requests": [_result(0.01, 0.01, 1).to_dict()]}
    path = save_result(doc, tmp_path, "x")
    back = load_result(path)
    assert back["summary"]["tpot_ms"]["mean"] is None
    assert plot_compare([back], tmp_path / "one.png").exists()
