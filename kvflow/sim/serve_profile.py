"""`kvflow profile --serve`: fit the latency model to a running server's own steps.

Timing `EngineCore.step()` alone misses what serving adds: sending each step's outputs, and the
API process (HTTP, detokenisation, streaming) competing for the same cores. So this starts
`kvflow serve --step-log` exactly as the deployment will run (colocated, or `--disagg ...`),
drives it with calibration loads unlike the workloads it will be validated on (a wide spread of
prompt lengths at a moderate rate, then a decode-heavy mix, then a burst of long prompts),
fits the model to every logged step (prefill-only, decode-only and mixed steps together), and
calibrates one more constant: the time between a token leaving the engine and reaching the
client (`frontend_s`), as the median gap between measured and simulated TTFT on those loads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvflow.bench.serve.config import ServeBenchConfig
from kvflow.bench.serve.runner import run_async
from kvflow.sim.latency import LatencyModel, fit_iterations, iteration_errors, learn_factors
from kvflow.sim.noise import fit_memory
from kvflow.sim.profile_io import Profile

Step = tuple[list[tuple[int, int]], list[int], float]  # (prompt chunks, decode contexts, seconds)


@dataclass(frozen=True)
class Load:
    """One calibration load: lengths uniform around their means (± range_ratio), Poisson arrivals."""

    input_len: int
    output_len: int
    range_ratio: float
    num_prompts: int
    rate: float


CALIBRATION = (
    Load(512, 64, 0.95, 120, 3.0),  # prompts of 26..998 tokens, some decoding alongside
    Load(64, 200, 0.5, 100, 8.0),  # decode batches of many sizes and contexts
    Load(1024, 16, 0.5, 30, 4.0),  # long prompts arriving faster than they finish: batched prefills
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProfiledServer:
    """`kvflow serve` with a step log, in its own session; stopped with SIGTERM."""

    def __init__(self, model: str, serve_args: str, log_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.step_log = log_dir / "steps"
        self.log_dir = log_dir
        cmd = [sys.executable, "-m", "kvflow.cli", "serve", "--model", model, "--port", str(self.port),
               "--no-access-log", "--step-log", str(self.step_log), *shlex.split(serve_args)]
        self._out = open(log_dir / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_dir / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1.0):
                    return  # urlopen raises on anything but a 2xx
            except OSError:  # refused while starting, timed out, or an HTTP error status
                pass
            time.sleep(0.3)
        raise TimeoutError("the server did not become healthy")

    def gauge(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith((name + "{", name + " ")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()

    def step_series(self) -> list[tuple[list[Step], list[float]]]:
        return read_step_series(self.log_dir)


def read_step_series(log_dir: Path) -> list[tuple[list[Step], list[float]]]:
    """Every instance's step log in `log_dir`: its steps and their start times (s), in time order."""
    return [step_series([json.loads(line) for line in path.read_text().splitlines()])
            for path in sorted(log_dir.glob("steps*"))]


# A gap after a step shorter than this is the core loop's own work (taking in requests, polling);
# a longer one is idle time.
LOOP_GAP_S = 0.005


def step_series(steps: list[dict[str, Any]]) -> tuple[list[Step], list[float]]:
    """Each step's share of the instance's time: from its start to the next step's start while the
    loop stays busy (what the clients see between tokens), else its own duration; and its start."""
    steps = sorted(steps, key=lambda step: step["t"])
    records = []
    for step, nxt in zip(steps, [*steps[1:], None]):
        took = step["s"]
        if nxt is not None and 0 <= nxt["t"] - step["t"] - took < LOOP_GAP_S:
            took = nxt["t"] - step["t"]
        records.append(([tuple(c) for c in step["p"]], step["d"], took))
    return records, [step["t"] for step in steps]


def run_loads(url: str, model: str | None, tokenizer: str, loads: tuple[Load, ...], seed: int) -> list[dict[str, Any]]:
    docs = []
    for i, load in enumerate(loads):
        cfg = ServeBenchConfig(
            base_url=url, model=model, tokenizer=tokenizer, num_prompts=load.num_prompts, request_rate=load.rate,
            random_input_len=load.input_len, random_range_ratio=load.range_ratio, random_output_len=load.output_len,
            seed=seed + 1000 + i, result_dir=None, plots=False, progress=False, label=f"calibration-{i}")
        docs.append(asyncio.run(run_async(cfg, log=lambda _: None)))
    return docs


def frontend_delay(docs: list[dict[str, Any]], simulate: Any) -> float:
    """Median (measured − simulated) TTFT over the calibration requests: the API path's share."""
    gaps = []
    for doc in docs:
        simulated = simulate(doc)
        for measured, sim in zip(doc["requests"], simulated):
            if measured["success"] and sim.success:
                gaps.append(measured["ttft_s"] - sim.ttft_s)
    return max(0.0, statistics.median(gaps)) if gaps else 0.0


def fit_server_steps(series: list[tuple[list[Step], list[float]]]
                     ) -> tuple[LatencyModel, dict[str, dict[str, float]]]:
    """The DistServe form fitted to every instance's steps, with per-bucket corrections learned on
    top and the jitter around them (its spread, and how much of it persists over time); and the
    error of each (per kind of step) on those steps."""
    records = [step for steps, _ in series for step in steps]
    if len(records) < 10:
        raise ValueError(f"only {len(records)} steps were logged: too few to fit a latency model")
    form = fit_iterations(records)
    model = learn_factors(form, records)
    residuals = []
    for steps, times in series:
        pairs = [(math.log(took / predicted), start) for (chunks, contexts, took), start in zip(steps, times)
                 if took > 0 and (predicted := model.iteration_time(chunks, contexts)) > 0]
        if pairs:
            residuals.append((np.array([r for r, _ in pairs]), np.array([t for _, t in pairs])))
    memory, tau = fit_memory(residuals)
    model = dataclasses.replace(model, noise_memory=memory, noise_tau_s=tau)
    return model, {"form": iteration_errors(form, records), "corrected": iteration_errors(model, records)}


def fit_profile_to_steps(profile: Profile, log_dir: str | Path) -> tuple[Profile, dict[str, dict[str, float]], int]:
    """`profile` with its latency model fitted to the step logs in `log_dir` instead; the fit's
    errors, and how many steps it saw."""
    series = read_step_series(Path(log_dir))
    if not series:
        raise ValueError(f"no step logs (steps*) in {log_dir}: run `kvflow serve --step-log {log_dir}/steps`")
    latency, errors = fit_server_steps(series)
    fitted = dataclasses.replace(profile, instance=dataclasses.replace(profile.instance, latency=latency))
    return fitted, errors, sum(len(steps) for steps, _ in series)
