"""`kvflow bench edge`: limits that hold (a cgroup or the RSS watchdog kills a child past its memory; the
child runs on the cores it was given), energy from RAPL counters (across a wrap) or a labelled estimate,
and the shipped model under 1 core / 1 GiB with consistent figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvflow.bench import edge
from kvflow.bench.edge_limits import (
    CgroupMemoryLimit,
    ProcessMonitor,
    Rapl,
    WatchdogMemoryLimit,
    child_setup,
    memory_limit,
    pick_cpus,
)

#: A child that holds `MiB` of touched memory for a while, then reports the CPUs it may run on.
HOG = "import os, sys, time; b = bytearray(int(sys.argv[1]) * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
      "time.sleep(0.6); print(sorted(os.sched_getaffinity(0)))"


def test_limits_parse_and_refuse_nonsense():
    assert edge.EdgeLimit.parse("1x2") == edge.EdgeLimit(1, 2.0)
    assert edge.EdgeLimit.parse("2x0.5") == edge.EdgeLimit(2, 0.5)
    assert edge.EdgeLimit.parse("4c8g") == edge.EdgeLimit(4, 8.0)
    assert edge.EdgeLimit(2, 4).label == "2 cores / 4 GiB" and edge.EdgeLimit(1, 2).memory_bytes == 2 * 2**30
    for bad in ("2", "x2", "0x1", "1x0"):
        with pytest.raises(ValueError):
            edge.EdgeLimit.parse(bad)
    with pytest.raises(ValueError, match="cores"):
        pick_cpus(len(os.sched_getaffinity(0)) + 1)


def _run_hog(mib: int, limit: WatchdogMemoryLimit | CgroupMemoryLimit) -> tuple[subprocess.CompletedProcess, int]:
    cpus = pick_cpus(1)
    proc = subprocess.Popen([sys.executable, "-c", HOG, str(mib)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=child_setup(cpus, limit))
    monitor = ProcessMonitor(proc.pid, limit, interval=0.02).start()
    out, _ = proc.communicate(timeout=60)
    monitor.stop()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), monitor.peak_rss_bytes


def test_the_watchdog_kills_a_child_past_the_limit_and_spares_one_under_it():
    under, peak = _run_hog(40, WatchdogMemoryLimit(400 * 2**20))
    assert under.returncode == 0 and json.loads(under.stdout) == pick_cpus(1)  # pinned to the first core
    assert 40 * 2**20 < peak < 400 * 2**20
    limit = WatchdogMemoryLimit(150 * 2**20)
    over, peak = _run_hog(400, limit)
    assert over.returncode == -9 and limit.killed() and peak > 150 * 2**20


def _cgroup_or_skip(limit_bytes: int) -> CgroupMemoryLimit:
    try:
        return CgroupMemoryLimit.create(limit_bytes, f"kvflow-edge-test-{os.getpid()}-{time.monotonic_ns()}")
    except (OSError, ValueError) as e:
        pytest.skip(f"no memory cgroup can be made here: {e}")


def test_a_cgroup_limit_kills_past_it_and_keeps_its_own_peak():
    limit = _cgroup_or_skip(150 * 2**20)
    try:
        over, _ = _run_hog(400, limit)
        assert over.returncode == -9 and limit.killed()
        assert limit.peak_bytes() is not None and limit.peak_bytes() <= 150 * 2**20
    finally:
        limit.close()
    assert not limit.directory.exists()
    limit = _cgroup_or_skip(400 * 2**20)
    try:
        under, _ = _run_hog(40, limit)
        assert under.returncode == 0 and not limit.killed() and 40 * 2**20 < limit.peak_bytes() <= 400 * 2**20
    finally:
        limit.close()


def test_memory_limit_auto_says_which_way_it_limits():
    limit = memory_limit(2**30, f"kvflow-edge-test-{os.getpid()}-auto", "auto")
    try:
        assert limit.method.startswith("cgroup v") or limit.method == "rss watchdog"
    finally:
        limit.close()
    assert memory_limit(2**30, "unused", "watchdog").method == "rss watchdog"
    with pytest.raises(ValueError):
        memory_limit(2**30, "unused", "ulimit")


def test_cgroup_v2_is_found_from_the_unified_line(tmp_path):
    root = tmp_path / "cgroup"
    (root / "kvflow.slice").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "kvflow.slice" / "cgroup.subtree_control").write_text("memory\n")
    limit = CgroupMemoryLimit.create(2**30, "child", root=root, proc_cgroup="0::/kvflow.slice\n")
    assert limit.version == 2 and (root / "kvflow.slice" / "child" / "memory.max").read_text() == str(2**30)
    (root / "kvflow.slice" / "cgroup.subtree_control").write_text("cpu\n")
    with pytest.raises(OSError, match="not enabled"):
        CgroupMemoryLimit.create(2**30, "other", root=root, proc_cgroup="0::/kvflow.slice\n")


def test_rapl_energy_crosses_a_counter_wrap(tmp_path):
    for name, start in (("intel-rapl:0", 900_000), ("intel-rapl:1", 10)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "energy_uj").write_text(str(start))
        (tmp_path / name / "max_energy_range_uj").write_text("1000000")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone (core): not counted twice
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("5")
    rapl = Rapl.find(tmp_path)
    assert [d.name for d in rapl.domains] == ["intel-rapl:0", "intel-rapl:1"]
    before = rapl.read()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100000")  # wrapped: 100k + 100k uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500010")
    assert rapl.joules(before, rapl.read()) == pytest.approx(0.2 + 0.5)
    assert Rapl.find(tmp_path / "absent") is None


def _result(**extra):
    r = {"load_s": 1.0, "walls": [2.0, 2.2, 2.4], "ttfts": [0.1, 0.2, 0.3], "outputs": [[7] * 64],
         "cpu_util": 0.9, "peak_rss_mib": 300.0, "cpu_s": 6.0, "section_s": 7.2, "section_wall": [10.0, 17.2]}
    return {**r, **extra}


def test_summary_figures_follow_from_the_measurements():
    plan = {"output_len": 64}
    s = edge.summarise(_result(), edge.EdgeLimit(2, 1.0), plan, watts_per_core=4.0)
    assert s["tokens_per_s"] == pytest.approx(64 / 2.2) and s["tokens_per_s"] * s["e2e_s"] == pytest.approx(64)
    assert s["ttft_s"] == pytest.approx(0.2) and s["tpot_ms"] == pytest.approx(1000 * 2.0 / 63)
    assert s["cpu_pct"] == pytest.approx(90) and s["ram_pct"] == pytest.approx(100 * 300 / 1024)
    assert s["energy_source"].startswith("estimate") and s["energy_j"] == pytest.approx(6.0 * 4.0)
    assert s["energy_j_per_token"] == pytest.approx(24.0 / (3 + 3 * 64))
    assert s["tokens_per_s_per_core"] == pytest.approx(s["tokens_per_s"] / 2)
    with pytest.raises(RuntimeError, match="generated 64 tokens, not 65"):
        edge.summarise(_result(), edge.EdgeLimit(1, 1.0), {"output_len": 65})


def test_summary_takes_rapl_energy_over_the_timed_section(tmp_path):
    (tmp_path / "intel-rapl:0").mkdir()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("0")
    rapl = Rapl.find(tmp_path)
    monitor = ProcessMonitor(os.getpid(), WatchdogMemoryLimit(2**40), rapl=rapl)
    monitor.energy_samples = [(9.0, [0]), (10.0, [1_000_000]), (17.2, [8_000_000]), (20.0, [9_000_000])]
    s = edge.summarise(_result(), edge.EdgeLimit(1, 1.0), {"output_len": 64}, monitor)
    assert s["energy_source"].startswith("RAPL") and s["energy_j"] == pytest.approx(7.0)


def test_the_shipped_model_under_one_core_and_one_gib(tmp_path, capsys):
    """The issue's check, through the command line: kvflow (and llama.cpp where it is installed) on the
    shipped model, 1 core / 1 GiB; every run completes; tokens/s x time = tokens; RSS under the limit."""
    from kvflow.bench.peers import check_peer, peer_python
    from kvflow.bench.throughput import BackendUnavailable
    from kvflow.cli import main

    engines = ["kvflow"]
    try:
        check_peer("llamacpp", peer_python("llamacpp"))
        engines.append("llamacpp")
    except BackendUnavailable:
        pass
    rc = main(["bench", "edge", "--limits", "1x1", "--input-len", "32", "--output-len", "24", "--repeats", "2",
               "--engines", *engines, "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "edge.json").read_text())
    assert rc == 0, report
    assert (tmp_path / "edge.png").stat().st_size > 0
    assert [r["engine"] for r in report["runs"]] == engines
    for run in report["runs"]:
        assert run["status"] == "ok" and run["model"] == "tiny" and run["limit"] == {"cores": 1, "memory_gib": 1.0}
        assert run["cpus"] == pick_cpus(1)
        assert run["memory_limiter"].startswith(("cgroup v", "rss watchdog"))
        assert run["output_tokens"] == 24 and run["repeats"] == 2
        assert run["tokens_per_s"] * run["e2e_s"] == pytest.approx(24, rel=1e-9)
        assert 0 < run["ttft_s"] < run["e2e_s"]
        assert 0 < run["peak_rss_mib"] * 2**20 < 2**30 and run["ram_pct"] == pytest.approx(
            100 * run["peak_rss_mib"] / 1024)
        # One core's worth: CPU time within the timed section's wall time (plus two clock ticks of rounding).
        assert 0 < run["cpu_s"] <= run["section_s"] + 2 / os.sysconf("SC_CLK_TCK")
        assert run["cpu_pct"] == pytest.approx(100 * run["cpu_s"] / run["section_s"])
        if run["cgroup_peak_mib"] is not None:
            assert run["cgroup_peak_mib"] <= 1024
        assert run["energy_j"] > 0 and (report["rapl"] is not None or run["energy_source"].startswith("estimate"))
    assert report["command"].startswith("kvflow bench edge --model tiny --formats bf16 --limits 1x1 --engines kvflow")
    assert "--input-len 32 --output-len 24 --repeats 2" in report["command"]
    out = capsys.readouterr().out
    assert "1 core / 1 GiB   tiny bf16      kvflow" in out and f"saved {tmp_path / 'edge.json'}" in out


def test_a_model_past_its_memory_limit_is_reported_killed_not_measured(tmp_path):
    """100 MiB cannot hold torch: the run ends as killed by the limit, with the method named."""
    name, path = edge.parse_model("tiny")
    case = edge.ModelCase(name, path, "bf16")
    gguf = edge.gguf_for(case, tmp_path)
    plan = edge.make_plan(edge.vocab_size(path), 8, 4, 1, 0)
    run = edge.run_limited("kvflow", case, gguf, edge.EdgeLimit(1, 0.1), plan, context_len=32, kv_cache_gib=0.01)
    assert run["status"] == "oom-killed" and "memory limit" in run["error"], run
    assert edge.format_run(run).endswith("oom-killed: killed by the memory limit")


def test_models_are_named_and_checked(tmp_path):
    assert edge.parse_model("tiny")[0] == "tiny"
    with pytest.raises(ValueError, match="make-model"):
        edge.parse_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert edge.parse_model(f"mine={tmp_path}") == ("mine", Path(tmp_path))
    with pytest.raises(ValueError, match="format"):
        edge.run_edge([("tiny", Path(tmp_path))], ["q2_k"], [edge.EdgeLimit(1, 1)])


def test_the_isa_threads_and_idle_wait_reach_the_child(tmp_path, monkeypatch):
    """--kvflow-isa sets KVFLOW_CPU_ISA for kvflow's child only; threads and --wait-idle go in its job."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_popen(args, env, preexec_fn, **kwargs):
        seen["args"], seen["env"] = args, env
        seen["job"] = json.loads(Path(args[-2]).read_text())
        raise Stop

    monkeypatch.setattr(edge.subprocess, "Popen", fake_popen)
    name, path = edge.parse_model("tiny")
    case = edge.ModelCase(name, path, "bf16")
    plan = edge.make_plan(edge.vocab_size(path), 8, 4, 1, 0)
    for engine in ("kvflow", "llamacpp"):
        with pytest.raises(Stop):
            edge.run_limited(engine, case, tmp_path / "m.gguf", edge.EdgeLimit(1, 1), plan, context_len=32,
                             kv_cache_gib=0.05, kvflow_isa="generic", wait_idle_s=5.0, limiter="watchdog",
                             python=sys.executable)
        assert seen["env"]["OMP_NUM_THREADS"] == "1"
        assert seen["job"]["threads"] == 1 and seen["job"]["wait_idle_s"] == 5.0 and seen["job"]["backend"] == engine
        if engine == "kvflow":
            assert seen["env"]["KVFLOW_CPU_ISA"] == "generic"
            assert seen["args"][1:3] == ["-m", "kvflow.bench.edge_worker"]
            assert seen["job"]["engine_kwargs"]["kv_cache_memory"] == 0.05
        else:
            assert seen["env"].get("KVFLOW_CPU_ISA") == os.environ.get("KVFLOW_CPU_ISA")
            assert seen["args"][1].endswith("peers/worker.py") and seen["job"]["gguf"] == str(tmp_path / "m.gguf")


MAPPER = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
          "print(sum(m[i] for i in range(0, len(m), 4096)))")


def test_a_run_is_charged_for_the_model_file_it_maps(tmp_path):
    """A page cache page is charged to the cgroup that read it first: a model file the parent wrote would map
    into a limited child for free. drop_page_cache makes the child read it, inside its own limit."""
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(96 * 2**20))  # in the page cache, charged to this process's group

    def mapped_peak(drop: bool) -> int:
        limit = _cgroup_or_skip(2**30)
        try:
            if drop:
                assert edge.drop_page_cache(model)
            proc = subprocess.run([sys.executable, "-c", MAPPER, str(model)], capture_output=True, text=True,
                                  preexec_fn=child_setup(pick_cpus(1), limit), timeout=60)
            assert proc.returncode == 0, proc.stderr
            return limit.peak_bytes()
        finally:
            limit.close()

    model.read_bytes()  # cached again
    assert mapped_peak(drop=False) < 60 * 2**20  # the interpreter only: the file's pages are charged elsewhere
    assert mapped_peak(drop=True) > 96 * 2**20  # read from disk into this group


def test_kvflow_can_run_quantised_weights_with_llamacpps_arithmetic():
    """--kvflow-quant-activations q8 reaches kvflow's engine for q8_0/q4_0 files (bf16 ones run exact), is
    recorded with each run and in the reproducing command."""
    from kvflow.cli import build_parser
    from kvflow.cli.bench import _edge_command

    limit = edge.EdgeLimit.parse("1x2")
    job = edge._job("kvflow", Path("m.gguf"), limit, {}, 0, 64, 0.25, quant_activations="q8")
    assert job["engine_kwargs"]["quant_activations"] == "q8"
    assert edge._job("kvflow", Path("m.gguf"), limit, {}, 0, 64, 0.25)["engine_kwargs"]["quant_activations"] == "exact"
    assert edge._job("llamacpp", Path("m.gguf"), limit, {}, 0, 64, 0.25, quant_activations="q8")["engine_kwargs"] == {}
    args = build_parser("bench").parse_args(["bench", "edge", "--formats", "q4_0", "--kvflow-quant-activations", "q8"])
    assert "--kvflow-quant-activations q8" in _edge_command(args)
    run = {"engine": "kvflow", "kvflow_isa": "avx2", "kvflow_quant_activations": "q8", "limit_label": "1 core / 2 GiB",
           "model": "135m", "format": "q4_0", "status": "failed", "error": "x"}
    assert "kvflow (avx2, q8 act)" in edge.format_run(run)
