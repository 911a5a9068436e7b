"""A live `kvflow serve` subprocess on a free port, and process-group bookkeeping for orphan checks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# Small engine: short context (fast fuzzing), small blocks (many block boundaries).
ENGINE_ARGS = ["--dtype", "float32", "--block-size", "4", "--num-blocks", "512", "--max-model-len", "128",
               "--max-request-bytes", str(1 << 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`kvflow serve` in its own session (process group), so no child can escape the checks."""

    def __init__(self, model: Path, log_path: Path, *extra: str, entry: tuple[str, ...] = ("-m", "kvflow.cli")) -> None:
        """`entry`: what follows the interpreter to run the `kvflow` command."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "KVFLOW_API_KEY": ""}
        cmd = [sys.executable, *entry, "serve", "--model", str(model), "--port", str(self.port),
               "--no-access-log", *ENGINE_ARGS, *extra]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def group_pids(self) -> list[int]:
        """Every live process in the server's process group (the server, its core, helpers)."""
        return group_members(self.proc.pid)

    def core_pid(self) -> int:
        for pid in self.group_pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                return pid
        raise RuntimeError("no engine-core process found")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc.pid)
        self._log.close()
        return self.proc.wait()


def group_members(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            pids.append(int(entry.name))
    return pids


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
