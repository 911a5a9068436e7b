"""--compare-kv entries (format, policy@fraction, both) and --kv-budget-fraction's per-request budgets,
without a model: parsing, errors, folder names, axis positions, floors and budgets."""

from __future__ import annotations

import json
import re

import pytest

from kvflow.config import CacheConfig, check_kv_policy
from kvflow.eval.kv_budget import KVBudgetRule, budget_rule, min_kv_budget
from kvflow.eval.kv_methods import KVMethod, parse_method, parse_methods
from kvflow.eval.runner import EvalConfig


@pytest.mark.parametrize("text, method, name, folder", [
    ("int8", KVMethod("int8"), "int8", "int8"),
    (" auto ", KVMethod("auto"), "auto", "auto"),
    ("snapkv@0.25", KVMethod("auto", "snapkv", 0.25), "snapkv@0.25", "snapkv-0.25"),
    ("quest@.125", KVMethod("auto", "quest", 0.125), "quest@0.125", "quest-0.125"),
    ("streaming@1", KVMethod("auto", "streaming", 1.0), "streaming@1", "streaming-1"),
    ("int8+snapkv@0.250", KVMethod("int8", "snapkv", 0.25), "int8+snapkv@0.25", "int8-snapkv-0.25"),
    ("fp8_e4m3+h2o@0.5", KVMethod("fp8_e4m3", "h2o", 0.5), "fp8_e4m3+h2o@0.5", "fp8_e4m3-h2o-0.5"),
    ("auto+h2o@0.5", KVMethod("auto", "h2o", 0.5), "h2o@0.5", "h2o-0.5"),
    ("snapkv@0.1234567", KVMethod("auto", "snapkv", 0.1234567), "snapkv@0.1234567", "snapkv-0.1234567"),
    ("kivi4", KVMethod("kivi4"), "kivi4", "kivi4"),
    ("kivi2", KVMethod("kivi2"), "kivi2", "kivi2"),
])
def test_entries_parse_to_methods_with_safe_folders(text, method, name, folder):
    parsed = parse_method(text)
    assert parsed == method and parsed.name == name and parsed.folder == folder
    assert re.fullmatch(r"[A-Za-z0-9._-]+", parsed.folder)
    assert parse_method(parsed.name) == parsed  # the canonical name reads back


@pytest.mark.parametrize("text, message", [
    ("snapkv", "snapkv needs a budget fraction, e.g. snapkv@0.25"),
    ("int8+quest", "quest needs a budget fraction"),
    ("snapkv@0", "must be a number in (0, 1], got '0'"),
    ("h2o@1.5", "got '1.5'"),
    ("h2o@nan", "got 'nan'"),
    ("snapkv@quarter", "got 'quarter'"),
    ("int8@0.5", "int8 is a KV-cache format, not a policy"),
    ("int8+fp8_e4m3", "fp8_e4m3 is a KV-cache format, not a policy"),
    ("none@0.5", "policy none keeps all KV"),
    ("snapkv+int8@0.25", "unknown format 'snapkv'"),
    ("int3", "unknown format 'int3'"),
    ("lru@0.5", "unknown format or policy 'lru'"),
    ("int8+", "nothing after '+'"),
])
def test_bad_entries_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_method(text)


def test_parse_methods_reports_every_bad_or_repeated_entry():
    assert [m.name for m in parse_methods(["auto", "int8", "snapkv@0.25", "int8+snapkv@0.25"])] == [
        "auto", "int8", "snapkv@0.25", "int8+snapkv@0.25"]
    with pytest.raises(ValueError) as info:
        parse_methods(["auto", "snapkv@0.25", "int3", "snapkv@.25", "quest"])
    text = str(info.value)
    assert "unknown format 'int3'" in text and "'snapkv@.25' repeats 'snapkv@0.25'" in text
    assert "quest needs a budget fraction" in text


def test_kv_ratios_kept_and_read():
    int8 = 1088 / 4096  # int8 of a 64-dim head over fp32: 64 bytes + a 4-byte scale per 256 bytes
    assert parse_method("int8").kv_ratios(int8) == (int8, int8)
    assert parse_method("snapkv@0.25").kv_ratios(1.0) == (0.25, 0.25)
    assert parse_method("int8+snapkv@0.25").kv_ratios(int8) == (int8 * 0.25, int8 * 0.25)
    assert parse_method("quest@0.125").kv_ratios(1.0) == (1.0, 0.125)  # quest keeps all KV, reads 1/8
    assert parse_method("quest@0.125").kv_ratios(1.0, 1 / 16) == (1.0625, 0.125)  # ... and its key bounds


@pytest.mark.parametrize("policy, sinks, window, expected", [
    ("streaming", 4, None, 5),  # window = budget - sinks must be >= 1
    ("h2o", 4, None, 4),
    ("snapkv", 4, None, 36),  # sinks + the 32-query observation window
    ("quest", 4, None, 4),
    ("quest", 0, None, 1),
    ("snapkv", 4, 8, 12),
    ("streaming", 16, 100, 116),
    ("h2o", 2, 50, 52),
])
def test_min_budget_is_the_edge_check_kv_policy_draws(policy, sinks, window, expected):
    floor = min_kv_budget(policy, sinks, window)
    assert floor == expected
    check_kv_policy(policy, floor, sinks, window)
    if floor > 1:
        with pytest.raises(ValueError):
            check_kv_policy(policy, floor - 1, sinks, window)


def test_min_budget_refuses_no_policy():
    with pytest.raises(ValueError, match="needs a KV policy"):
        min_kv_budget("none", 4, None)


def test_budgets_from_a_fraction():
    rule = KVBudgetRule("snapkv", 0.25, 36)
    assert [rule.budget(n) for n in (100, 144, 145, 512, 1000, 2037)] == [36, 36, 36, 128, 250, 509]
    assert rule.kept_share([20, 1000]) == pytest.approx((20 + 250) / 1020)  # a 20-token prompt keeps all of it
    assert rule.kept_share([]) is None
    assert rule.to_dict() == {"policy": "snapkv", "fraction": 0.25, "floor": 36}

    cache = CacheConfig(kv_policy="quest", kv_budget=64, kv_sink_tokens=8)
    assert budget_rule(cache, 0.125) == KVBudgetRule("quest", 0.125, 8)
    assert budget_rule(CacheConfig(kv_policy="streaming", kv_budget=64, kv_window=16), 0.5).floor == 20
    with pytest.raises(ValueError, match="start the engine with kv_policy"):
        budget_rule(CacheConfig(), 0.25)
    with pytest.raises(ValueError, match=re.escape("kv_budget_fraction must be in (0, 1]")):
        budget_rule(cache, 0.0)
    with pytest.raises(ValueError, match="kv_budget_fraction"):
        EvalConfig(kv_budget_fraction=1.5)


class _FakeLLM:
    """Records the SamplingParams the eval's engine functions send, answers with fixed outputs."""

    def __init__(self) -> None:
        self.params: list = []

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        self.params = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            lps = [None] + [{t: SimpleNamespace(logprob=-1.0)} for t in ids[1:]]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=" 1")], prompt_logprobs=lps))
        return outs


def test_each_request_gets_its_own_budget():
    from kvflow.eval.perplexity import engine_score_fn
    from kvflow.eval.retrieval import engine_generate_fn

    rule = KVBudgetRule("h2o", 0.25, 4)
    prompts = [[1] * 8, [1] * 100, [1] * 2048]
    llm = _FakeLLM()
    engine_generate_fn(llm, kv_budget=rule.budget)(prompts, [3, 3, 3])
    assert [p.kv_budget for p in llm.params] == [4, 25, 512] and all(p.max_tokens == 3 for p in llm.params)
    engine_score_fn(llm, kv_budget=rule.budget)(prompts)
    assert [p.kv_budget for p in llm.params] == [4, 25, 512] and all(p.prompt_logprobs == 0 for p in llm.params)
    engine_generate_fn(llm)(prompts, [3, 3, 3])  # without a rule: the engine's own budget
    assert [p.kv_budget for p in llm.params] == [None, None, None]


def test_saved_results_are_reused_only_with_the_same_kv_settings(tmp_path):
    from kvflow.eval.kv_compare import _load

    config = EvalConfig(lengths=(96,), kv_budget_fraction=0.25)
    cache = {"kv_cache_dtype": "auto", "kv_policy": "snapkv", "kv_budget": 36, "kv_sink_tokens": 4, "kv_window": None}
    path = tmp_path / "results.json"
    saved_config = json.loads(json.dumps(config.__dict__))
    path.write_text(json.dumps({"config": saved_config, "engine": {"cache": cache}}))
    want = {"kv_cache_dtype": "auto", "kv_policy": "snapkv", "kv_sink_tokens": 4, "kv_window": None}
    assert _load(path, config, want) is not None
    assert _load(path, config, {**want, "kv_sink_tokens": 8}) is None
    assert _load(path, config, {**want, "kv_policy": "h2o"}) is None
    assert _load(path, EvalConfig(lengths=(96,), kv_budget_fraction=0.5), want) is None
    assert _load(path, EvalConfig(lengths=(96,)), want) is None
    # A result saved before KV policies existed (no kv_policy, no fraction) stands for the plain format.
    del saved_config["kv_budget_fraction"]
    path.write_text(json.dumps({"config": saved_config, "engine": {"cache": {"kv_cache_dtype": "int8"}}}))
    assert _load(path, EvalConfig(lengths=(96,)), {"kv_cache_dtype": "int8", "kv_policy": "none"}) is not None
    assert _load(path, EvalConfig(lengths=(96,)), {"kv_cache_dtype": "auto", "kv_policy": "none"}) is None


def test_table_and_figure_from_rows(tmp_path):
    from kvflow.eval.kv_compare import _summary, format_comparison, save_comparison
    from kvflow.eval.kv_figure import plot_x
    from kvflow.eval.report import PPL_PREFILL_NOTE
    from tests.eval.test_eval_end_to_end import png_size

    def result(ppl: float, passkey: float) -> dict:
        grid = {"lengths": [512, 1024], "accuracy": [[passkey, passkey]], "mean_accuracy": passkey}
        return {"perplexity": {"perplexity": ppl}, "passkey": grid, "multikey": None}

    rows = [_summary(parse_method("auto"), result(8.0, 1.0), 4096, 4096),
            _summary(parse_method("int8+snapkv@0.25"), result(8.0, 0.5), 1088, 4096),
            _summary(parse_method("quest@0.125"), result(8.4, 0.75), 4096, 4096, 1 / 16)]
    assert [plot_x(r) for r in rows] == [1.0, 1088 / 4096 / 4, 0.125]  # quest: at the KV it reads
    assert rows[1]["passkey_by_length"] == {"512": 0.5, "1024": 0.5} and rows[1]["multikey"] is None
    table = format_comparison(rows, baseline="auto").splitlines()
    assert table[0].split() == ["method", "bytes/token", "KV", "kept", "KV", "read", "perplexity", "Δ", "ppl",
                                "passkey", "multikey"]
    assert table[2].split() == ["auto", "4,096", "1.000", "1.000", "8.000", "+0.00%", "1.000", "-"]
    assert table[3].split() == ["int8+snapkv@0.25", "1,088", "0.066", "0.066", "8.000", "+0.00%", "0.500", "-"]
    assert table[4].split() == ["quest@0.125", "4,096", "1.062", "0.125", "8.400", "+5.00%", "0.750", "-"]
    assert table[-1] == PPL_PREFILL_NOTE
    json_path, png_path = save_comparison(rows, tmp_path, "title")
    assert json.loads(json_path.read_text()) == rows and png_size(png_path)[0] > 1000


@pytest.mark.parametrize("given, kivi, other", [(None, 32, None), (16, 32, 16), (48, 32, 48), (32, 32, 32),
                                                 (64, 64, 64)])
def test_kivi_methods_page_in_blocks_of_a_multiple_of_32(given, kivi, other):
    for fmt in ("kivi4", "kivi2"):
        method = parse_method(fmt)
        assert method.block_size(given) == kivi
        args = method.engine_args(4, None, given)
        assert args == {"kv_cache_dtype": fmt, "kv_policy": "none", "kv_budget": None, "block_size": kivi}
        CacheConfig(**{k: v for k, v in args.items() if k != "kv_budget"})  # the engine accepts it
    for text in ("auto", "int8", "fp8_e4m3", "int8+snapkv@0.25"):  # paging does not change the others' numbers
        assert parse_method(text).engine_args(4, None, given)["block_size"] == other


def test_kivi_rows_report_the_ring_per_context_length(tmp_path):
    from kvflow.assets import default_model_path
    from kvflow.eval.kv_compare import _summary, kv_bytes_per_token

    grid = {"lengths": [512, 2048], "accuracy": [[1.0, 1.0]], "mean_accuracy": 1.0}
    result = {"perplexity": {"perplexity": 8.0}, "passkey": grid, "multikey": None,
              "engine": {"cache": {"kv_cache_dtype": "kivi2", "block_size": 32, "kv_residual_tokens": 128}}}
    kv_bytes, dense = kv_bytes_per_token(str(default_model_path()), "float32", "kivi2", 32)
    # the shipped tiny model: 4 layers, 2 kv heads, head_dim 64; codes + an fp16 scale and zero per 32
    assert (kv_bytes, dense) == (4 * 2 * 2 * (16 + 8), 4 * 2 * 2 * 64 * 4)
    row = _summary(parse_method("kivi2"), result, kv_bytes, dense)
    assert row["kv_kept_ratio"] == kv_bytes / dense and row["kv_ring_tokens"] == 160 and row["block_size"] == 32
    assert row["kv_kept_ratio_by_length"] == {"512": kv_bytes / dense + 160 / 512,
                                              "2048": kv_bytes / dense + 160 / 2048}
    from kvflow.eval.kv_compare import save_comparison
    from tests.eval.test_eval_end_to_end import png_size

    _, png = save_comparison([row], tmp_path, "title")  # with the ring's note under the panels
    assert png_size(png)[0] > 1000
    plain = _summary(parse_method("int8"), {**result, "engine": {"cache": {"kv_cache_dtype": "int8"}}}, 1088, dense)
    assert plain["kv_ring_tokens"] == 0 and plain["kv_kept_ratio_by_length"] == {"512": 1088 / dense,
                                                                                   "2048": 1088 / dense}


def test_specontext_keeps_all_its_kv_plus_its_keys_and_reads_the_fraction():
    method = parse_method("specontext@0.25")
    assert (method.kv_policy, method.fraction, method.folder) == ("specontext", 0.25, "specontext-0.25")
    assert method.kv_ratios(0.5, 0.07) == pytest.approx((0.57, 0.125))
