"""`kvflow bench attention`: the paged case matches its contiguous copy, every CPU implementation
agrees with the naive reference, and the CLI writes its JSON."""

from __future__ import annotations

import json

import pytest
import torch

from kvflow.bench.attention import AttentionCase, available, run_case
from kvflow.cli import main


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_cpu_implementations_agree_with_the_naive_reference(kind):
    case = AttentionCase(kind, batch=2, seq_len=37, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8,
                         dtype=torch.float32, device=torch.device("cpu"))
    # The paged cache holds exactly the contiguous K/V that SDPA and naive read.
    b, blk = 1, case.block_tables[1, 2].item()
    assert torch.equal(case.kv_cache[0, blk, :, 3], case.keys[b, :, 2 * 8 + 3])
    impls = available(torch.device("cpu"))
    assert {"sdpa", "naive"} <= set(impls) and "triton" not in impls
    results = run_case(case, impls, repeats=1, naive_max_len=64)
    decode_only = {n for n in impls if n.endswith("-quest")} if kind == "prefill" else set()
    kivi = {n for n in impls if n.endswith(("-kivi4", "-kivi2"))}  # not on 8-token blocks of 32 channels
    assert {r.implementation for r in results} == set(impls) - decode_only - kivi
    for r in results:
        assert r.max_abs_err is not None and r.max_abs_err < 1e-4, r
        assert r.ms > 0
        assert (r.tflops if kind == "prefill" else r.gbs) > 0


def test_naive_is_skipped_past_its_length_and_sdpa_becomes_the_reference():
    case = AttentionCase("decode", 1, 40, 2, 1, 16, 16, torch.float32, torch.device("cpu"))
    results = run_case(case, available(torch.device("cpu"), ("sdpa", "naive")), repeats=1, naive_max_len=32)
    assert [r.implementation for r in results] == ["sdpa"]
    assert results[0].reference is None and results[0].max_abs_err == 0.0


def test_cli_writes_results(tmp_path, capsys):
    out = tmp_path / "att.json"
    assert main(["bench", "attention", "--kind", "decode", "--seq-len", "20", "--heads", "4/1", "--head-dim", "32",
                 "--dtype", "float32", "--impl", "sdpa", "naive", "triton", "--repeats", "1",
                 "--output", str(out)]) == 0
    assert "not available on cpu: triton" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["kind"] == "attention" and len(payload["results"]) == 2


def test_bad_head_layout_is_rejected():
    with pytest.raises(ValueError, match="multiple"):
        AttentionCase("prefill", 1, 8, 3, 2, 16, 4, torch.float32, torch.device("cpu"))


def test_peak_memory_shows_the_materialised_score_matrix():
    """naive holds the 1024 x 1024 x 4-head fp32 scores (16 MiB, twice with the softmax); the
    flash-style SDPA stays far below that."""
    from kvflow.bench.attention import peak_extra_mib

    case = AttentionCase("prefill", 1, 1024, 4, 4, 32, 16, torch.float32, torch.device("cpu"))
    naive, sdpa = peak_extra_mib(case, "naive"), peak_extra_mib(case, "sdpa")
    assert naive >= 16, naive
    assert sdpa < naive / 2, (sdpa, naive)


def _result(impl, kind, n, ms, err=1e-3, dtype="bfloat16"):
    from kvflow.bench.attention import AttentionResult

    reference = "naive" if err is not None else None
    return AttentionResult(impl, kind, 1, n, 32, 8, 128, dtype, ms, None, None, err, reference)


def test_check_targets_passes_and_fails_on_the_goals():
    from kvflow.bench.attention import check_targets, format_checks

    results = [
        _result("triton", "prefill", 2048, 5.0), _result("sdpa", "prefill", 2048, 1.0),  # short: ratio unchecked
        _result("triton", "prefill", 4096, 1.2), _result("sdpa", "prefill", 4096, 1.0),  # 1.2x: passes
        _result("triton", "prefill", 16384, 14.0), _result("sdpa", "prefill", 16384, 10.0),  # 1.4x: fails
        _result("triton", "decode", 16384, 0.2), _result("triton-nosplit", "decode", 16384, 0.5),  # passes
        _result("triton", "decode", 8192, 0.3, err=0.2), _result("triton-nosplit", "decode", 8192, 0.2),  # both fail
        _result("triton", "decode", 1024, 0.3), _result("triton-nosplit", "decode", 1024, 0.1),  # short: unchecked
    ]
    checks = check_targets(results)
    verdicts = {(c.claim.split(":")[0], c.claim.split(": ")[1]): c.passed for c in checks}
    assert verdicts[("triton prefill B=1 n=4096 H/KVH=32/8 D=128 bfloat16", "within 1.3x of SDPA")]
    assert not verdicts[("triton prefill B=1 n=16384 H/KVH=32/8 D=128 bfloat16", "within 1.3x of SDPA")]
    assert verdicts[("triton decode B=1 n=16384 H/KVH=32/8 D=128 bfloat16", "split faster than non-split")]
    assert not verdicts[("triton decode B=1 n=8192 H/KVH=32/8 D=128 bfloat16", "split faster than non-split")]
    assert not verdicts[("triton decode B=1 n=8192 H/KVH=32/8 D=128 bfloat16", "matches naive")]
    assert not any("n=2048" in c.claim and "SDPA" in c.claim for c in checks)
    assert not any("n=1024" in c.claim and "non-split" in c.claim for c in checks)
    assert len([c for c in checks if "matches" in c.claim]) == 9  # every triton and triton-nosplit result
    passed = sum(c.passed for c in checks)
    assert format_checks(checks).splitlines()[-1] == f"{passed}/{len(checks)} target checks passed"


def test_cli_check_targets_fails_without_triton_results(capsys):
    assert main(["bench", "attention", "--kind", "decode", "--seq-len", "20", "--heads", "4/1", "--head-dim", "32",
                 "--dtype", "float32", "--impl", "sdpa", "--repeats", "1", "--check-targets"]) == 1
    assert "no target checks apply" in capsys.readouterr().out


def test_check_targets_quantised_decode_speedup():
    from kvflow.bench.attention import check_targets

    results = [
        _result("triton", "decode", 8192, 1.0), _result("triton-int8", "decode", 8192, 0.6),  # 1.67x: passes
        _result("triton-fp8", "decode", 8192, 0.8),  # 1.25x: fails
        _result("triton", "decode", 4096, 1.0), _result("triton-int8", "decode", 4096, 0.9),  # short: unchecked
    ]
    verdicts = {c.claim: c.passed for c in check_targets(results) if "faster than dense" in c.claim}
    assert verdicts == {
        "triton-int8 decode B=1 n=8192 H/KVH=32/8 D=128 bfloat16: 1.5x faster than dense KV": True,
        "triton-fp8 decode B=1 n=8192 H/KVH=32/8 D=128 bfloat16: 1.5x faster than dense KV": False,
    }


def test_quantised_cpu_implementations_match_their_dequantised_cache():
    """kvflow-cpu-int8 / -fp8 are checked against naive over their own dequantised cache (so the
    error is the kernel's alone), and their GB/s count the bytes their format reads."""
    case = AttentionCase("decode", 2, 70, 4, 2, 64, 16, torch.bfloat16, torch.device("cpu"))
    impls = available(torch.device("cpu"), ("kvflow-cpu", "kvflow-cpu-int8", "kvflow-cpu-fp8", "naive"))
    if "kvflow-cpu-int8" not in impls:
        pytest.skip("no C++ compiler")
    results = {r.implementation: r for r in run_case(case, impls, repeats=1, naive_max_len=128)}
    for name in ("kvflow-cpu-int8", "kvflow-cpu-fp8"):
        assert results[name].reference == "naive" and results[name].max_abs_err < 2e-2
    assert case.work("int8") == 2 * 2 * 70 * 2 * (64 + 4) and case.work("fp8_e4m3") == 2 * 2 * 70 * 2 * 64
    assert case.work() == 2 * 2 * 70 * 2 * 64 * 2


def test_quest_reads_fewer_blocks_and_matches_attention_over_them():
    """kvflow-cpu-quest attends over exactly the blocks Quest chose (its error against naive over
    those blocks is the kernel's), which is not full attention (Quest is lossy), and counts only
    the bytes it reads; prefill cases skip it."""
    case = AttentionCase("decode", 2, 300, 4, 2, 64, 16, torch.float32, torch.device("cpu"), quest_budget=64)
    impls = available(torch.device("cpu"), ("kvflow-cpu-quest", "naive"))
    if "kvflow-cpu-quest" not in impls:
        pytest.skip("no C++ compiler")
    tables, lens = case.quest_blocks()
    assert lens.tolist() == [(4 - 1) * 16 + 300 - 18 * 16] * 2 and tables.shape[1] == 4
    assert tables[:, 0].tolist() == case.block_tables[:, 0].tolist()  # the sink block
    assert tables[:, -1].tolist() == case.block_tables[:, -1].tolist()  # the query's own block
    results = {r.implementation: r for r in run_case(case, impls, repeats=1, naive_max_len=512)}
    assert results["kvflow-cpu-quest"].max_abs_err < 1e-4
    assert float((case.quest_reference().float() - _full(case)).abs().max()) > 1e-3
    assert case.quest_work() == 2 * 2 * 64 * 4 * (2.0 * 64 + 2.0 * 19)
    prefill = AttentionCase("prefill", 1, 32, 4, 2, 64, 16, torch.float32, torch.device("cpu"))
    assert [r.implementation for r in run_case(prefill, impls, 1, 64)] == ["naive"]


def _full(case: AttentionCase) -> torch.Tensor:
    from kvflow.bench.attention import _naive

    return _naive(case).float()


def test_check_targets_quest_speedup():
    from kvflow.bench.attention import check_targets

    results = [_result("triton", "decode", 8192, 1.0), _result("triton-quest", "decode", 8192, 0.25),
               _result("triton", "decode", 16384, 1.0), _result("triton-quest", "decode", 16384, 0.5)]
    verdicts = [c.passed for c in check_targets(results) if "reading every block" in c.claim]
    assert verdicts == [True, False]


def test_kivi_state_is_the_cache_a_kivi_prompt_leaves():
    """The KIVI implementations' cache (kivi_state) is what kivi.store_kivi leaves after a prompt of
    the context: the torch reference (kivi.kivi_attention) over it and the query's own k, v gives the
    case's `quantised_reference`; GB/s count Q tokens' codes and meta and the rest dense; prefill and
    16-token blocks are not KIVI cases."""
    from kvflow.attention import kivi

    case = AttentionCase("decode", 2, 200, 4, 2, 64, 32, torch.float32, torch.device("cpu"))
    state = case.kivi_state("kivi4")
    assert state.step.quantised_list == [64, 64] and state.k.shape == (2, 2, 64)
    codes, meta, ring = state.cache
    assert codes.shape[-1] == 32 and meta.shape[-1] == 4 and ring.shape == (2, 2, 2, 160, 64)
    assert torch.equal(ring[0, 1, :, 198 % 160], case.keys[1, :, 198])  # the newest context token, dense
    expected = kivi.kivi_attention(case.q, state.k, state.v, state.cache, state.step, case.block_tables, [1, 1],
                                   [0, 1], case.scale)
    reference = case.quantised_reference("kivi4")
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    from kvflow.bench.attention import _naive

    assert float((reference - _naive(case)).abs().max()) > 1e-3  # it is lossy
    assert case.work("kivi4") == 2 * 2 * 2 * (64 * (32 + 8) + 136 * 64 * 4)
    assert case.work("kivi2") == 2 * 2 * 2 * (64 * (16 + 8) + 136 * 64 * 4)
    assert not AttentionCase("decode", 1, 40, 2, 1, 64, 16, torch.float32, torch.device("cpu")).kivi_applies()
    prefill = AttentionCase("prefill", 1, 40, 2, 1, 64, 32, torch.float32, torch.device("cpu"))
    assert not prefill.kivi_applies()
    stub = {"triton-kivi4": lambda c: 1 / 0, "naive": available(torch.device("cpu"), ("naive",))["naive"]}
    assert [r.implementation for r in run_case(prefill, stub, 1, 64)] == ["naive"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kivi_implementations_agree_with_naive_over_their_cache(dtype):
    """kvflow-cpu-kivi4 / -kivi2 (the C++ kernel) over kivi_state's cache: within rounding of naive over
    the dequantised blocks, the ring and the own k, v (and far from naive over the dense cache)."""
    impls = available(torch.device("cpu"), ("kvflow-cpu-kivi4", "kvflow-cpu-kivi2", "naive"))
    if "kvflow-cpu-kivi4" not in impls:
        pytest.skip("no C++ build")
    case = AttentionCase("decode", 3, 250, 6, 2, 64, 32, dtype, torch.device("cpu"))
    results = run_case(case, impls, repeats=1, naive_max_len=512)
    assert [r.implementation for r in results] == ["kvflow-cpu-kivi4", "kvflow-cpu-kivi2", "naive"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for r in results[:2]:
        assert r.reference == "naive" and r.max_abs_err is not None and r.max_abs_err < tol, r
        assert r.gbs > 0
    kivi2 = impls["kvflow-cpu-kivi2"](case).float()
    assert float((kivi2 - _full(case)).abs().max()) > 1e-3  # the dequantised cache, not the dense one


def test_check_targets_kivi_decode_speedup():
    from kvflow.bench.attention import check_targets

    results = [_result("triton", "decode", 8192, 1.0), _result("triton-kivi4", "decode", 8192, 0.5),
               _result("triton-kivi2", "decode", 8192, 0.9)]
    verdicts = {c.claim.split(" ")[0]: c.passed for c in check_targets(results) if "faster than dense" in c.claim}
    assert verdicts == {"triton-kivi4": True, "triton-kivi2": False}
