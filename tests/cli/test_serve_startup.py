"""`kvflow serve` startup: a taken port fails before the model loads; an engine that cannot start is one line."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvflow.cli.serve import bind_socket
from tests.server.server_utils import free_port

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "KVFLOW_API_KEY": ""}


def _serve(model: Path, port: int, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kvflow.cli", "serve", "--model", str(model), "--port", str(port),
                           "--num-blocks", "64"], capture_output=True, text=True, env=ENV, timeout=timeout)
    return done, time.monotonic() - start


def _weightless(llama_dir: Path, tmp_path: Path) -> Path:
    """A model whose config is fine and whose weights are missing: it fails only when the engine loads it."""
    model = tmp_path / "weightless"
    model.mkdir()
    shutil.copy(llama_dir / "config.json", model / "config.json")
    return model


@pytest.fixture
def listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_port_fails_at_once_before_the_model_loads(llama_dir: Path, tmp_path: Path, listener: int):
    """One line naming the address, exit 1, in about the time Python takes to start (the model never loads:
    with a model that would fail to load, the port is still what is reported)."""
    expected = (f"kvflow: error: cannot listen on http://127.0.0.1:{listener}: Address already in use "
                "(another server is running there; stop it or pass another --port)")
    for model in (llama_dir, _weightless(llama_dir, tmp_path)):
        done, seconds = _serve(model, listener)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines() == [expected]
        assert seconds < 20, seconds  # ~2 s on 2 busy cores; loading the engine would come first without the check


def test_bind_socket_names_a_port_out_of_range():
    with pytest.raises(SystemExit, match=r"^kvflow: error: cannot listen on http://127.0.0.1:70000: "):
        bind_socket("127.0.0.1", 70000)


def test_bind_socket_is_bound_and_not_yet_listening():
    """Until the engine is ready connections are refused, as before (uvicorn listened after its lifespan)."""
    with bind_socket("127.0.0.1", 0) as sock:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sock.getsockname(), timeout=5).close()


def test_an_engine_that_cannot_start_is_one_line_not_a_lifespan_traceback(llama_dir: Path, tmp_path: Path):
    model = _weightless(llama_dir, tmp_path)
    done, _ = _serve(model, free_port())
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (f"kvflow: error: the engine core failed to start: ValueError: {model} has no "
                         f"*.safetensors weights")
    assert "lifespan" not in done.stderr and "Application startup failed" not in done.stderr
    # No traceback at all: the engine-core process reports its failure to the server and exits quietly.
    assert "Traceback (most recent call last)" not in done.stderr, done.stderr  # the core exits quietly too
