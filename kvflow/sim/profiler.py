"""`kvflow profile`: measure the engine's iteration latency on this machine and fit a latency model.

The simulator is only as good as its latency model, so the profile times the engine's own
`EngineCore.step()` — scheduling, the forward pass, sampling: what an instance spends per
iteration when serving — over a grid of prefill batches (prompt lengths) and decode batches
(batch size × context length), fits DistServe's forms (kvflow/sim/latency.py), and checks the
fit on mixed iterations (a prompt chunk batched with decodes, as colocated chunked prefill does)
it was not fitted on. Each point is the median of a few repeats; prompts are random token ids,
so no prefix-cache hit shortens a prefill.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvflow.config import EngineConfig
from kvflow.sim.latency import LatencyModel, decode_features, fit_linear, prefill_features


@dataclass(frozen=True)
class ProfileGrid:
    prefill_lengths: tuple[int, ...] = (16, 64, 128, 256, 512, 1024, 2048)
    prefill_batches: tuple[int, ...] = (1, 2, 4, 8)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (32, 256, 1024, 2048)
    decode_steps: int = 6  # timed decode iterations per (batch, context) point
    # Mixed iterations to validate the model on: (chunk tokens, decodes, their context).
    mixed: tuple[tuple[int, int, int], ...] = ((64, 8, 256), (256, 16, 512), (512, 4, 1024), (128, 32, 128))
    repeats: int = 3

    @classmethod
    def quick(cls) -> ProfileGrid:
        """A few seconds on the test model: for tests and a first look."""
        return cls((16, 128, 384), (1, 4), (1, 8, 32), (32, 384), 3, ((64, 4, 128),), 2)


@dataclass
class Sample:
    kind: str  # prefill | decode | mixed
    chunks: list[tuple[int, int]]  # (new tokens, cached tokens) of each prompt chunk
    contexts: list[int]  # context length of each decode
    seconds: float


@dataclass
class ProfileResult:
    latency: LatencyModel
    samples: list[Sample] = field(default_factory=list)
    mixed_mape: float | None = None  # the fitted model's error on the mixed iterations
    num_blocks: int = 0  # KV blocks of the profiled engine


class _Driver:
    """Feeds one `EngineCore` the batches a grid point needs and times its steps."""

    def __init__(self, config: EngineConfig, seed: int) -> None:
        from kvflow.engine.core import EngineCore

        self.core = EngineCore(config)
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.vocab = config.model.vocab_size
        self.ids = itertools.count()

    def _request(self, length: int, max_tokens: int) -> Any:
        from kvflow.core.request import Request
        from kvflow.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        tokens = self.rng.integers(0, self.vocab, size=length).tolist()
        return Request(f"p{next(self.ids)}", tokens, params, max_model_len=self.config.model.max_model_len)

    def _timed_step(self) -> float:
        start = time.perf_counter()
        self.core.step()
        return time.perf_counter() - start

    def drain(self) -> None:
        """Run what is left (at most a couple of tokens per request) so the next point starts empty."""
        while self.core.has_unfinished_requests():
            self.core.step()

    def prefill(self, lengths: Sequence[int]) -> float | None:
        """One step computing these whole prompts (None if the scheduler would not take them at once)."""
        requests = [self._request(n, 1) for n in lengths]
        for request in requests:
            self.core.add_request(request)
        seconds = self._timed_step()
        complete = all(r.num_computed_tokens >= r.num_prompt_tokens for r in requests)
        self.drain()
        return seconds if complete else None

    def decode(self, batch: int, context: int, steps: int, chunk: int = 0) -> list[Sample]:
        """Time `steps` decode iterations of `batch` sequences (and, with `chunk`, one mixed
        iteration with a new prompt of that many tokens joining them)."""
        running = [self._request(context, steps + 2) for _ in range(batch)]
        for request in running:
            self.core.add_request(request)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in running):
            self.core.step()  # prefill, untimed
        samples = []
        if chunk:
            contexts = [r.num_tokens for r in running]
            self.core.add_request(self._request(chunk, 1))
            samples.append(Sample("mixed", [(chunk, 0)], contexts, self._timed_step()))
        else:
            for _ in range(steps):
                contexts = [r.num_tokens for r in running]
                samples.append(Sample("decode", [], contexts, self._timed_step()))
        self.drain()
        return samples


def profile_engine(config: EngineConfig, grid: ProfileGrid | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> ProfileResult:
    """Measure the grid on an engine built from `config`, then fit prefill and decode models."""
    grid = grid or ProfileGrid()
    say = progress or (lambda _: None)
    driver = _Driver(config, seed)
    limit = min(config.model.max_model_len - 1, config.scheduler.max_num_batched_tokens)
    for _ in range(2):  # warm-up: first calls build kernels and caches
        driver.prefill([min(64, limit)])
        driver.decode(2, min(64, limit), 2)
    samples: list[Sample] = []
    for batch, length in itertools.product(grid.prefill_batches, grid.prefill_lengths):
        if length > limit or batch * length > config.scheduler.max_num_batched_tokens or \
                batch > config.scheduler.max_num_seqs:
            continue
        times = [t for t in (driver.prefill([length] * batch) for _ in range(grid.repeats)) if t is not None]
        if times:
            samples.append(Sample("prefill", [(length, 0)] * batch, [], statistics.median(times)))
            say(f"prefill {batch} x {length}: {1e3 * samples[-1].seconds:.1f} ms")
    for batch, context in itertools.product(grid.decode_batches, grid.decode_contexts):
        if context + grid.decode_steps + 2 > config.model.max_model_len or batch > config.scheduler.max_num_seqs:
            continue
        runs = [driver.decode(batch, context, grid.decode_steps) for _ in range(grid.repeats)]
        for step in zip(*runs):  # one sample per decode step: the median over the repeats
            samples.append(Sample("decode", [], step[0].contexts, statistics.median(s.seconds for s in step)))
        say(f"decode {batch} x {context}: {1e3 * samples[-1].seconds:.2f} ms")
    mixed: list[Sample] = []
    for chunk, batch, context in grid.mixed:
        if chunk > limit or context + 4 > config.model.max_model_len:
            continue
        runs = [driver.decode(batch, context, 1, chunk=chunk)[0] for _ in range(grid.repeats)]
        mixed.append(Sample("mixed", runs[0].chunks, runs[0].contexts, statistics.median(r.seconds for r in runs)))
    result = fit_samples(samples, mixed)
    result.num_blocks = driver.core.kv.num_blocks
    driver.core.close()
    return result


def fit_samples(samples: Sequence[Sample], mixed: Sequence[Sample] = ()) -> ProfileResult:
    """Fit the two models; score them on the mixed samples they never saw."""
    prefill = [s for s in samples if s.kind == "prefill"]
    decode = [s for s in samples if s.kind == "decode"]
    latency = LatencyModel(
        fit_linear(np.array([prefill_features(s.chunks) for s in prefill]), np.array([s.seconds for s in prefill])),
        fit_linear(np.array([decode_features(s.contexts) for s in decode]), np.array([s.seconds for s in decode])),
    )
    mixed_mape = None
    if mixed:
        errors = [abs(latency.iteration_time(s.chunks, s.contexts) - s.seconds) / s.seconds for s in mixed]
        mixed_mape = float(np.mean(errors))
    return ProfileResult(latency, [*samples, *mixed], mixed_mape)


def hardware_description(threads: int) -> dict[str, Any]:
    """This machine as the profile's hardware key: CPU model and the threads the engine used."""
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kind": "cpu", "name": name, "threads": threads, "cores_visible": len(os.sched_getaffinity(0))}
