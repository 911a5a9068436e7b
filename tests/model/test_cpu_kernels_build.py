"""Building the C++ CPU kernels: one build folder per source content and per checkout, and a console
announcement with progress while it compiles (never when the build is loaded from the cache). No compiler
needed: the build itself is faked."""

from __future__ import annotations

import io
import shutil
import time
import types
from pathlib import Path

import pytest

from kvflow.model import cpu_kernels


def _checkout(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of kvflow/csrc at `root`, made the sources cpu_kernels builds from."""
    shutil.copytree(cpu_kernels.CSRC, root)
    monkeypatch.setattr(cpu_kernels, "CSRC", root)
    monkeypatch.setattr(cpu_kernels, "SOURCE", root / cpu_kernels.SOURCE.name)
    return root


def test_two_checkouts_keep_a_build_folder_each(tmp_path, monkeypatch):
    """torch's build.ninja names the source path: two checkouts sharing a folder rebuild each other's build."""
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path / "cache"))
    _checkout(tmp_path / "a" / "csrc", monkeypatch)
    first = cpu_kernels.build_dir()
    assert cpu_kernels.build_dir() == first  # the same checkout: the same folder, every time
    _checkout(tmp_path / "b" / "csrc", monkeypatch)  # the same files elsewhere
    second = cpu_kernels.build_dir()
    assert second != first and second.parent == first.parent == tmp_path / "cache" / "cpu_model"
    monkeypatch.setattr(cpu_kernels, "CSRC", tmp_path / "a" / "csrc")
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "a" / "csrc" / cpu_kernels.SOURCE.name)
    assert cpu_kernels.build_dir() == first  # back to the first: its folder again


def _fake_build(seconds: float, calls: list[Path]):
    def build(directory: Path) -> types.ModuleType:
        calls.append(directory)
        time.sleep(seconds)
        (directory / cpu_kernels.LIBRARY).write_bytes(b"")
        return types.ModuleType(cpu_kernels.EXTENSION)

    return build


def test_a_compile_is_announced_with_progress_and_a_cached_load_is_silent(tmp_path):
    out, calls = io.StringIO(), []
    module = cpu_kernels.build_announced(tmp_path, _fake_build(0.35, calls), stream=out, interval=0.1)
    assert module.__name__ == cpu_kernels.EXTENSION and calls == [tmp_path]
    lines = out.getvalue().splitlines()
    assert lines[0] == f"kvflow: compiling the C++ CPU kernels for this machine, once (about a minute) into {tmp_path}"
    assert len(lines) >= 4 and all(line.startswith("kvflow: still compiling the C++ CPU kernels... ")
                                   for line in lines[1:-1])
    assert lines[-1].startswith("kvflow: compiled the C++ CPU kernels in ") and lines[-1].endswith(" s")

    cached = io.StringIO()
    cpu_kernels.build_announced(tmp_path, _fake_build(0.35, calls), stream=cached, interval=0.1)
    assert cached.getvalue() == "" and calls == [tmp_path, tmp_path]  # still loaded, by torch's load


def test_a_failed_compile_says_so_and_raises(tmp_path):
    def broken(directory: Path) -> types.ModuleType:
        raise RuntimeError("error building extension")

    out = io.StringIO()
    with pytest.raises(RuntimeError, match="error building extension"):
        cpu_kernels.build_announced(tmp_path, broken, stream=out, interval=10)
    assert out.getvalue().splitlines()[-1] == "kvflow: compiling the C++ CPU kernels failed after 0 s"


def test_load_extension_announces_on_stderr(tmp_path, monkeypatch, capsys):
    """On stderr, not through logging: the engine-core process (and `kvflow generate`) set no log handler."""
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(cpu_kernels, "_build", _fake_build(0.0, calls))
    cpu_kernels.load_extension.cache_clear()
    try:
        assert cpu_kernels.load_extension().__name__ == cpu_kernels.EXTENSION
        assert calls == [cpu_kernels.build_dir()] and calls[0].parent == tmp_path / "cpu_model"
    finally:
        cpu_kernels.load_extension.cache_clear()  # the next caller gets the real build back
    err = capsys.readouterr().err
    assert "kvflow: compiling the C++ CPU kernels" in err and "kvflow: compiled the C++ CPU kernels in 0 s" in err


CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross-compiler (Debian: apt install g++-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", ["cpu_model.cpp", "cpu_quant.cpp"])
def test_the_kernels_compile_for_arm64(source, tmp_path):
    """The arm64 image builds the kernels with the `generic` ISA (-march=armv8-a): every x86 intrinsic must
    sit behind its guard. Compiled, not run (no arm64 machine here), with this torch's headers."""
    import subprocess
    import sysconfig

    import torch.utils.cpp_extension as ext

    includes = [flag for path in ext.include_paths() for flag in ("-isystem", path)]
    flags = [f for f in cpu_kernels.CFLAGS if not f.startswith(("-march=", "-O"))] + ["-O0"]  # errors, not speed
    march = cpu_kernels.march("generic", "aarch64")
    cmd = [CROSS, "-c", "-fPIC", "-std=c++20", *flags, f"-march={march}", "-DTORCH_EXTENSION_NAME=x",
           *includes, "-isystem", sysconfig.get_paths()["include"], str(cpu_kernels.CSRC / source),
           "-o", str(tmp_path / "out.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "out.o").read_bytes()[18] == 183  # ELF e_machine EM_AARCH64
