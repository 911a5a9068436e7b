"""Fast checks of kvflow.bench: model maker, machine limits, throughput harness and CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from kvflow.bench.fast_path_check import NEAR_TIE_NATS
from kvflow.bench.limits import MachineLimits, measure_limits
from kvflow.bench.make_model import SHAPES, llama_param_count, make_model, shape_params
from kvflow.bench.throughput import BACKENDS, BackendUnavailable, make_prompts, run_throughput
from kvflow.bench.throughput_report import format_table, run_many
from kvflow.cli import build_parser
from kvflow.cli import main as cli_main
from kvflow.cli.bench import parse_backend_args


def _kvflow_llm_importable() -> bool:
    """True once the engine's offline API exists, so the kvflow test starts running by itself."""
    try:
        from kvflow import LLM, SamplingParams  # noqa: F401
    except ImportError:
        return False
    return True


KVFLOW_READY = _kvflow_llm_importable()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def small_limits() -> MachineLimits:
    return measure_limits(n=256, bw_mib=16, repeats=2)


def test_reference_shapes_match_benchmarks() -> None:
    assert set(SHAPES) == {"135m", "500m"}
    assert llama_param_count(shape_params("135m")) == 134_515_008
    assert abs(llama_param_count(shape_params("500m")) - 494e6) < 1e6


def test_make_model_loads_in_transformers(tiny_model: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    files = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    cfg = AutoConfig.from_pretrained(tiny_model)
    expected = shape_params("tiny")
    assert cfg.model_type == "llama"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings"):  # fmt: skip
        assert getattr(cfg, key) == expected[key], key
    assert cfg.tie_word_embeddings
    assert json.loads((tiny_model / "config.json").read_text())["rope_theta"] == 10000.0
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == llama_param_count(expected)
    std = model.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert 0.015 < std < 0.025  # normal(0, initializer_range=0.02)
    assert GenerationConfig.from_pretrained(tiny_model).eos_token_id == 2


def test_make_model_is_seeded(tmp_path: Path, tiny_model: Path) -> None:
    from safetensors.torch import load_file

    same = load_file(make_model("tiny", tmp_path / "a", seed=0) / "model.safetensors")
    other = load_file(make_model("tiny", tmp_path / "b", seed=1) / "model.safetensors")
    ref = load_file(tiny_model / "model.safetensors")
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    assert not torch.equal(other["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


def test_make_model_overrides_and_errors(tmp_path: Path) -> None:
    from transformers import AutoConfig

    path = make_model("tiny", tmp_path / "m", overrides={"num_hidden_layers": 1})
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown shape"):
        make_model("7b", tmp_path / "x")


def test_limits_are_positive(small_limits: MachineLimits) -> None:
    assert small_limits.bf16_gflops > 0 and small_limits.fp32_gflops > 0
    assert small_limits.mem_bw_gbs > 0 and small_limits.threads >= 1
    assert small_limits.decode_step_floor_s(1e9) == pytest.approx(1 / small_limits.mem_bw_gbs)
    assert small_limits.tokens_per_s_ceiling(1e9) == pytest.approx(small_limits.bf16_gflops / 2)


def test_prompts_are_seeded_and_in_range() -> None:
    a = make_prompts(3, 10, 1000, seed=0)
    assert a == make_prompts(3, 10, 1000, seed=0) != make_prompts(3, 10, 1000, seed=1)
    assert all(100 <= t < 900 for p in a for t in p)
    assert make_prompts(3, 10, 1000, seed=0, stream=1) != a


@pytest.mark.parametrize("workload", ["offline", "single"])
def test_hf_throughput_exact_lengths(
    tiny_model: Path, small_limits: MachineLimits, workload: str
) -> None:
    r = run_throughput(
        tiny_model, "hf", workload, num_prompts=3, input_len=12, output_len=9, repeats=2,
        limits=small_limits,
    )  # fmt: skip
    n = 3 if workload == "offline" else 1
    assert len(r["token_ids"]) == n
    assert all(len(t) == 9 for t in r["token_ids"])
    assert r["output_tok_s"] > 0 and r["peak_rss_mib"] > 0 and r["fraction_of_limit"] > 0
    assert 0 < r["loaded_rss_mib"] <= r["peak_rss_mib"]  # resident after loading; the peak mark covers it
    if workload == "single":
        assert r["ms_per_token"] > 0 and r["ttft_ms"] > 0
    assert len(r["wall_s_all"]) == 2


def test_unknown_backend_and_workload(tiny_model: Path, small_limits: MachineLimits) -> None:
    with pytest.raises(ValueError, match="known backends"):
        run_throughput(tiny_model, "nope", "offline", limits=small_limits)
    with pytest.raises(ValueError, match="unknown workload"):
        run_throughput(tiny_model, "hf", "serving", limits=small_limits)
    assert {"hf", "kvflow", "vllm", "llamacpp"} <= set(BACKENDS)


def test_kvflow_backend_unavailable_is_clear(
    tiny_model: Path, small_limits: MachineLimits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kvflow.llm", None)  # as if the engine were missing
    with pytest.raises(BackendUnavailable, match="kvflow"):
        run_throughput(tiny_model, "kvflow", "single", output_len=2, limits=small_limits)


def test_kvflow_fast_path_is_checked_before_timing(
    tiny_model: Path, small_limits: MachineLimits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 tiny model runs the C++ forward on prepacked weights; its outputs are compared
    with the plain path (fp32 strictly, bf16 up to near-ties), and a path that changed them is refused."""
    r = run_throughput(tiny_model, "kvflow", "single", input_len=8, output_len=4, limits=small_limits)
    assert len(r["token_ids"][0]) == 4  # the check passed (equal outputs), then it was timed
    fp32, bf16 = r["fast_path_checks"]
    assert (fp32["dtype"], fp32["identical"], fp32["near_ties"]) == ("float32", 4, [])
    assert bf16["dtype"] == "bfloat16" and bf16["identical"] + len(bf16["near_ties"]) == 4
    assert all(d["gap_nats"] <= NEAR_TIE_NATS for d in bf16["near_ties"])

    from kvflow.model.cpu_kernels import CpuForward

    honest = CpuForward.__call__
    monkeypatch.setattr(CpuForward, "__call__", lambda self, *a, **kw: honest(self, *a, **kw).roll(1, -1))
    with pytest.raises(RuntimeError, match="changed greedy outputs"):
        run_throughput(tiny_model, "kvflow", "single", input_len=8, output_len=4, limits=small_limits)


def test_run_many_saves_json_and_table(
    tiny_model: Path, small_limits: MachineLimits, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "r.json"
    report = run_many(
        tiny_model, ["hf"], ["offline", "single"], output=out, num_prompts=2, input_len=8,
        output_len=4, limits=small_limits,
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["limits"]["bf16_gflops"] == small_limits.bf16_gflops
    assert [r["workload"] for r in saved["runs"]] == ["offline", "single"]
    assert "token_ids" not in saved["runs"][0] and report["path"] == str(out)
    printed = capsys.readouterr().out
    assert "hf" in printed and str(out) in printed
    assert format_table(saved["runs"]).count("\n") == 3


def test_cli_parses_and_dispatches(tiny_model: Path, tmp_path: Path) -> None:
    parser = build_parser("bench")
    args = parser.parse_args(
        ["bench", "throughput", "--model", "m", "--backend", "kvflow", "hf",
         "--workload", "offline", "single", "--backend-arg", "kvflow:max_num_seqs=64"]
    )  # fmt: skip
    assert args.backend == ["kvflow", "hf"] and args.workload == ["offline", "single"]
    assert args.num_prompts == 64 and args.input_len == 128 and args.output_len == 128
    assert callable(args.func)
    assert parse_backend_args(["kvflow:enable_prefix_caching=true", "kvflow:kv_cache_memory=1.5"]) == {
        "kvflow": {"enable_prefix_caching": True, "kv_cache_memory": 1.5}
    }
    with pytest.raises(argparse.ArgumentTypeError):
        parse_backend_args(["max_num_seqs=64"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "make-model", "--shape", "tiny", "--out", "x"])
    mm = parser.parse_args(["bench", "make-model", "--shape", "135m", "--out", "x"])
    assert mm.tokenizer == "auto"
    mm = parser.parse_args(["bench", "make-model", "--shape", "135m", "--out", "x", "--tokenizer", "none"])
    assert mm.tokenizer == "none"
    tp = parser.parse_args(["bench", "throughput", "--model", "m", "--python", "vllm=/v/bin/python"])
    assert tp.python == ["vllm=/v/bin/python"]
    out = tmp_path / "cli.json"
    assert cli_main(
        ["bench", "throughput", "--model", str(tiny_model), "--backend", "hf", "--workload",
         "single", "--input-len", "8", "--output-len", "3", "--output", str(out)]
    ) == 0  # fmt: skip
    assert json.loads(out.read_text())["runs"][0]["output_len"] == 3


@pytest.mark.skipif(not KVFLOW_READY, reason="kvflow.LLM not importable yet")
def test_kvflow_backend_matches_hf(tiny_model: Path, small_limits: MachineLimits) -> None:
    """Exact lengths in bf16; in float32 the first greedy token (prefill only) must equal HF's."""
    r = run_throughput(
        tiny_model, "kvflow", "offline", num_prompts=3, input_len=12, output_len=9,
        limits=small_limits,
    )  # fmt: skip
    assert [len(t) for t in r["token_ids"]] == [9, 9, 9]
    kw = dict(num_prompts=4, input_len=16, output_len=4, dtype="float32", limits=small_limits)
    ours = run_throughput(tiny_model, "kvflow", "offline", **kw)["token_ids"]
    ref = run_throughput(tiny_model, "hf", "offline", **kw)["token_ids"]
    assert [t[0] for t in ours] == [t[0] for t in ref]
