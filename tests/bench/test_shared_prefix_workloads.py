"""The shared-prefix workloads of ``kvflow bench throughput`` (fewshot, docqa, noshare): generator
shapes, seeding and shuffling, the sharing checked with the prefix planner, per-request output
lengths reaching kvflow, HF and a (fake) vLLM worker, and the CLI."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from kvflow.bench.limits import MachineLimits
from kvflow.bench.make_model import make_model
from kvflow.bench.shared_prefix_workloads import SharedPrefixSizes, make_batch
from kvflow.bench.throughput import plan_prompts, run_throughput
from kvflow.cli import build_parser
from kvflow.cli import main as cli_main
from kvflow.cli.bench import parse_backend_args
from kvflow.core.prefix_tree import plan_prefix_groups

LIMITS = MachineLimits(bf16_gflops=100.0, fp32_gflops=50.0, mem_bw_gbs=10.0, threads=1, gemm_n=64, bw_mib=1)
SMALL = SharedPrefixSizes(groups=3, group_requests=4, shared_tokens=20, suffix_tokens=4, output_min=2, output_max=6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


def test_sizes_defaults_scale_and_checks() -> None:
    full = SharedPrefixSizes().resolve("fewshot")
    assert (full.groups, full.group_requests, full.shared_tokens, full.suffix_tokens) == (64, 16, 1024, 32)
    assert (full.output_min, full.output_max, full.num_requests) == (64, 512, 1024)
    doc = SharedPrefixSizes().resolve("docqa")
    assert (doc.groups, doc.group_requests, doc.output_min, doc.output_max) == (16, 32, 32, 256)
    small = SharedPrefixSizes(length_scale=0.125, groups=8).resolve("fewshot")
    assert (small.groups, small.shared_tokens, small.suffix_tokens, small.output_min, small.output_max) == (
        8, 128, 4, 8, 64)  # fmt: skip
    assert SharedPrefixSizes(output_max=20).resolve("fewshot").output_min == 20  # one bound given
    with pytest.raises(ValueError, match="output_min"):
        SharedPrefixSizes(output_min=9, output_max=3).resolve("fewshot")
    with pytest.raises(ValueError, match="positive"):
        SharedPrefixSizes(groups=0).resolve("docqa")
    with pytest.raises(ValueError, match="unknown"):
        SharedPrefixSizes().resolve("offline")


@pytest.mark.parametrize("workload", ["fewshot", "docqa", "noshare"])
def test_batches_are_seeded_shuffled_and_in_range(workload: str) -> None:
    sizes = SharedPrefixSizes(groups=6, group_requests=8, shared_tokens=40, suffix_tokens=6, output_min=3,
                              output_max=9)  # fmt: skip
    b = make_batch(workload, sizes, 1000, seed=1)
    assert len(b.prompts) == len(b.max_tokens) == len(b.group) == 48
    assert b == make_batch(workload, sizes, 1000, seed=1)
    assert b.prompts != make_batch(workload, sizes, 1000, seed=2).prompts
    assert b.prompts != make_batch(workload, sizes, 1000, seed=1, stream=1).prompts
    assert all(100 <= t < 900 for p in b.prompts for t in p)
    assert all(3 <= n <= 9 for n in b.max_tokens) and len(set(b.max_tokens)) > 1
    if workload == "docqa":
        assert {len(p) - s for p, s in zip(b.prompts, b.shared_len)} <= set(range(3, 13))
        assert all(20 <= s <= 80 for s in b.shared_len)
    else:
        assert {len(p) for p in b.prompts} == {46}
    if workload != "noshare":
        assert sorted(b.group) == [g for g in range(6) for _ in range(8)]
        # shuffled: not in group order, and same-group neighbours about as rare as by chance (7/47)
        assert b.group != sorted(b.group)
        adjacent = sum(x == y for x, y in zip(b.group, b.group[1:]))
        assert adjacent <= 15


@pytest.mark.parametrize("workload", ["fewshot", "docqa"])
def test_groups_share_exactly_their_prefix(workload: str) -> None:
    """The prefix planner finds the workload's groups, each sharing exactly its prefix, and nothing more."""
    b = make_batch(workload, SharedPrefixSizes(groups=5, group_requests=6, shared_tokens=30, suffix_tokens=5),
                   vocab_size=512, seed=3)
    plan = plan_prefix_groups(b.prompts)
    truth = {frozenset(i for i, g in enumerate(b.group) if g == k) for k in set(b.group)}
    assert {frozenset(g.members) for g in plan.groups} == truth
    for g in plan.groups:
        assert g.prefix_len == b.shared_len[g.members[0]]
    assert plan.saving_ratio == pytest.approx(plan.optimal_saving_ratio) and plan.saving_ratio > 0.8
    if workload == "fewshot":
        assert {g.prefix_len for g in plan.groups} == {30}
    assert plan_prefix_groups(b.prompts, 16).groups[0].prefix_len % 16 == 0


def test_noshare_shares_nothing() -> None:
    b = make_batch("noshare", SharedPrefixSizes(groups=10, group_requests=30, shared_tokens=8, suffix_tokens=2),
                   vocab_size=512)  # 300 requests: nearly every usable first token
    plan = plan_prefix_groups(b.prompts)
    assert plan.logical_prefix_tokens == 0 and len(plan.groups) == 300 and plan.saving_ratio == 0.0
    assert b.shared_len == [0] * 300
    with pytest.raises(ValueError, match="distinct first tokens"):
        make_batch("noshare", SharedPrefixSizes(groups=20, group_requests=20), vocab_size=512)


def test_plan_carries_per_request_max_tokens() -> None:
    plan = plan_prompts("fewshot", 64, 128, 128, 512, seed=0, repeats=2, shared_prefix=SMALL)
    batches = [make_batch("fewshot", SMALL, 512, 0, r) for r in range(2)]
    assert plan.timed == [b.prompts for b in batches]
    assert plan.timed_max_tokens == [b.max_tokens for b in batches]
    assert plan.max_tokens(1) == batches[1].max_tokens and plan.output_len == max(max(b.max_tokens) for b in batches)
    assert plan.probes == [] and plan.warmup is not None and len(plan.warmup) == 4
    assert not set(map(tuple, plan.warmup)) & set(map(tuple, plan.timed[0]))
    assert plan_prompts("offline", 3, 5, 7, 512).max_tokens(0) == 7


def test_kvflow_runs_fewshot_with_each_requests_length(tiny_model: Path) -> None:
    """Exact per-request lengths (greedy, ignore_eos), the prefix plan at the engine's block size,
    and the KV peak against the budget."""
    sizes = SharedPrefixSizes(groups=2, group_requests=3, shared_tokens=40, suffix_tokens=4, output_min=2,
                              output_max=6)  # fmt: skip
    r = run_throughput(tiny_model, "kvflow", "fewshot", limits=LIMITS, shared_prefix=sizes, repeats=2,
                       engine_kwargs={"max_num_seqs": 4})  # fmt: skip
    plan = plan_prompts("fewshot", 1, 1, 1, 512, repeats=2, shared_prefix=sizes)
    assert [len(t) for t in r["token_ids"]] == plan.timed_max_tokens[0]
    assert r["output_tokens"] == sum(plan.timed_max_tokens[0]) and r["prompt_tokens"] == 6 * 44
    assert r["total_tok_s"] > r["output_tok_s"] > 0 and r["num_prompts"] == 6
    pp = r["prefix_plan"]
    assert (pp["block_size"], pp["block_size_from"], pp["groups"]) == (16, "engine", 2)
    assert pp["logical_prefix_tokens"] == 6 * 32 and pp["processed_prefix_tokens"] == 2 * 32
    assert pp["saving_ratio"] == pytest.approx(1 - 64 / 192) == pytest.approx(pp["optimal_saving_ratio"])
    kv = r["kv"]
    assert 0 < kv["peak_kv_blocks"] <= kv["kv_blocks"] and kv["block_size"] == 16
    assert len(kv["peak_kv_blocks_all"]) == 2 and all(q > 0 for q in kv["prefix_queried_tokens_all"])


def test_hf_cuts_rows_to_their_lengths(tiny_model: Path) -> None:
    r = run_throughput(tiny_model, "hf", "docqa", limits=LIMITS, shared_prefix=SMALL, warmup=False)
    plan = plan_prompts("docqa", 1, 1, 1, 512, shared_prefix=SMALL, warmup=False)
    assert [len(t) for t in r["token_ids"]] == plan.timed_max_tokens[0]
    assert r["prefix_plan"]["block_size_from"] == "kvflow default" and "hf_note" in r


FAKE_VLLM = """
import json, os
__version__ = "0.0-fake"

class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, ignore_eos=False, detokenize=True):
        self.temperature, self.max_tokens, self.ignore_eos = temperature, max_tokens, ignore_eos

class _Out:
    def __init__(self, ids):
        self.outputs = [type("C", (), {"token_ids": ids})()]

class LLM:
    def __init__(self, model, dtype="auto", **kwargs):
        cache = type("Cache", (), {"block_size": 32, "enable_prefix_caching": True, "num_gpu_blocks": 99})()
        self.llm_engine = type("E", (), {"vllm_config": type("V", (), {"cache_config": cache})()})()

    def generate(self, prompts, params, use_tqdm=True):
        each = params if isinstance(params, list) else [params] * len(prompts)
        assert all(p.temperature == 0.0 and p.ignore_eos for p in each)
        with open(os.environ["FAKE_PEER_RECORD"], "a") as f:
            f.write(json.dumps([p.max_tokens for p in each]) + "\\n")
        return [_Out([100 + i % 7 for i in range(p.max_tokens)]) for p in each]
"""


def test_vllm_worker_gets_each_requests_length(tiny_model: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_PEER_RECORD", str(record))
    r = run_throughput(tiny_model, "vllm", "fewshot", limits=LIMITS, shared_prefix=SMALL,
                       python={"vllm": sys.executable})  # fmt: skip
    plan = plan_prompts("fewshot", 1, 1, 1, 512, shared_prefix=SMALL)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [[4] * 4, plan.timed_max_tokens[0]]  # warm-up, then the timed batch
    assert r["peer"]["info"] == {"block_size": 32, "enable_prefix_caching": True, "num_gpu_blocks": 99}
    assert r["kv"]["kv_blocks"] == 99 and r["kv"]["peak_kv_blocks"] is None
    assert (r["prefix_plan"]["block_size"], r["prefix_plan"]["block_size_from"]) == (32, "engine")


def test_cli_shared_prefix_options_and_engine_args(tiny_model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser("bench").parse_args(
        ["bench", "throughput", "--model", "m", "--workload", "fewshot", "docqa", "noshare", "--groups", "4",
         "--group-requests", "2", "--length-scale", "0.1", "--backend-arg", "kvflow:batch_policy=prefix-tree"]
    )  # fmt: skip
    assert (args.groups, args.group_requests, args.length_scale, args.shared_tokens) == (4, 2, 0.1, None)
    assert parse_backend_args(args.backend_arg) == {"kvflow": {"batch_policy": "prefix-tree"}}
    out = tmp_path / "r.json"
    argv = ["bench", "throughput", "--model", str(tiny_model), "--backend", "hf", "--workload", "noshare",
            "--groups", "2", "--group-requests", "2", "--shared-tokens", "6", "--suffix-tokens", "2",
            "--output-min", "2", "--output-max", "3", "--no-warmup", "--output", str(out)]  # fmt: skip
    monkeypatch.setattr("kvflow.bench.throughput_report.measure_limits", lambda: LIMITS)
    assert cli_main(argv) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["workload"] == "noshare" and run["num_prompts"] == 4 and run["prompt_tokens"] == 32
    assert run["prefix_plan"]["logical_prefix_tokens"] == 0 and run["shared_prefix_sizes"]["groups"] == 2
