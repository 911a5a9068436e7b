"""KVFLOW_CPU_ISA: the C++ kernels built for a stated baseline instead of this machine (the container
image's AVX2 build; the generic loops an edge box without AVX-512 runs), keyed so that a portable build
made on one machine loads on another, and — in the slow test — the parity suites passing on the generic
build forced on this AVX-512 machine."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.model import cpu_kernels

ROOT = Path(__file__).resolve().parents[2]
X86 = platform.machine() == "x86_64"


def test_portable_isas_map_to_a_baseline_march_and_unknown_ones_are_refused():
    assert cpu_kernels.march("native") == "native"
    assert cpu_kernels.march("avx2", "x86_64") == "x86-64-v3"
    assert cpu_kernels.march("generic", "x86_64") == "x86-64"
    assert cpu_kernels.march("generic", "aarch64") == "armv8-a"
    with pytest.raises(ValueError, match="avx2.*aarch64.*native, generic"):
        cpu_kernels.march("avx2", "aarch64")


def _flags_under(isa: str) -> list[str]:
    code = "from kvflow.model import cpu_kernels as c; print(c.cpu_isa(), c.CFLAGS[1], c.isa_key(), sep='|')"
    env = {**os.environ, cpu_kernels.ISA_ENV: isa}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split("|")


@pytest.mark.skipif(not X86, reason="x86-64 ISAs")
def test_the_environment_picks_the_march_and_a_bad_value_falls_back_to_native():
    assert _flags_under("generic") == ["generic", "-march=x86-64", "-march=x86-64"]
    assert _flags_under("AVX2") == ["avx2", "-march=x86-64-v3", "-march=x86-64-v3"]
    isa, march, key = _flags_under("neon")  # not an x86 ISA: logged, and the machine's own build
    assert (isa, march) == ("neon", "-march=native") and key.startswith("flags")


def test_a_portable_build_is_keyed_by_its_isa_not_by_this_cpu(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "CFLAGS", ["-O3", "-march=x86-64-v3", "-fopenmp"])
    portable = cpu_kernels.build_dir()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : sse2")  # another machine
    assert cpu_kernels.build_dir() == portable
    monkeypatch.setattr(cpu_kernels, "CFLAGS", ["-O3", "-march=native", "-fopenmp"])
    native = cpu_kernels.build_dir()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : sse2 avx512f")
    assert cpu_kernels.build_dir() != native != portable


@pytest.mark.skipif(not X86 or shutil.which("c++") is None, reason="an x86-64 C++ compiler")
@pytest.mark.parametrize(("isa", "avx2"), [("generic", False), ("avx2", True)])
def test_the_baseline_builds_have_no_avx512(isa, avx2):
    """What the kernels' `#if defined(__AVX512F__)` see under each portable -march."""
    flag = f"-march={cpu_kernels.march(isa, 'x86_64')}"
    out = subprocess.run(["c++", flag, "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True,
                         timeout=60)
    macros = set(line.split()[1] for line in out.stdout.splitlines() if line.startswith("#define"))
    assert "__AVX512F__" not in macros and "__AVX512BF16__" not in macros
    assert ("__AVX2__" in macros) == avx2 and ("__FMA__" in macros) == avx2


PARITY_SUITES = ["tests/model/test_parity.py", "tests/model/test_cpu_kernels.py", "tests/model/quant/test_kernels.py",
                 "tests/model/quant/test_cpu_quant_model.py", "tests/model/test_cpu_kivi.py",
                 "tests/model/test_cpu_shared_prefix.py"]


@pytest.mark.slow
@pytest.mark.skipif(not X86 or shutil.which("c++") is None, reason="an x86-64 C++ compiler")
def test_parity_suites_pass_on_the_forced_generic_kernels():
    """The generic C++ loops (no AVX-512: what an edge box runs), compiled on this machine by forcing
    KVFLOW_CPU_ISA=generic, against the PyTorch reference and Hugging Face: about 8 minutes on 2 cores
    (two compiles, then the suites)."""
    env = {**os.environ, cpu_kernels.ISA_ENV: "generic"}
    check = ("from kvflow.model import cpu_kernels as c; from kvflow.model.quant import kernels as k; "
             "m = c.load_extension(); assert m is not None and k.load_extension() is not None, 'no build'; "
             "assert not m.has_decode_gemv, 'the AVX512-BF16 GEMV is in a generic build'; print(c.CFLAGS[1])")
    built = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0 and built.stdout.strip() == "-march=x86-64", built.stderr[-3000:]
    # (test_build_folder_changes_with_source_flags_and_cpu is about a native build's key: not this one's.)
    native_key = "--deselect=tests/model/test_cpu_kernels.py::test_build_folder_changes_with_source_flags_and_cpu"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", native_key, *PARITY_SUITES],
                         cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-5000:]
