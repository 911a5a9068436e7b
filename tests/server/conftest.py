"""Fixtures: live `kvflow serve` subprocesses, and the offline LLM whose outputs they must match."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.server_utils import ServerProcess


@pytest.fixture(scope="session")
def model_dir(llama_dir: Path) -> Path:
    return llama_dir


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("server") / "serve.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def offline(model_dir: Path):
    from kvflow import LLM

    return LLM(model=str(model_dir), dtype="float32", block_size=4, num_blocks=512, max_model_len=128)


@pytest.fixture
def start_server(model_dir: Path, tmp_path: Path):
    """Factory for servers a test may break; all are killed (whole process group) afterwards."""
    started: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        proc = ServerProcess(model_dir, tmp_path / f"serve{len(started)}.log", *extra)
        started.append(proc)
        return proc.wait_ready()

    yield start
    for proc in started:
        proc.stop(timeout=10)
