"""Offline and single-stream throughput of kvflow and its peers on the same model and token ids.

Every backend gets the same seeded random prompts, decodes greedily for exactly ``output_len``
tokens (EOS ignored) and is timed by the same code here, so the numbers differ only by engine.
Each result is also set against this machine's physical floor (see ``limits``).

The shared-prefix workloads (``fewshot``, ``docqa``, ``noshare``; ``shared_prefix_workloads``)
give each request its own output length, carried to every backend as a list of ``max_tokens``, and
report the batch's prefix plan (``kvflow.core.prefix_tree``: R_saving and its multi-level optimum).

Backends live in a registry (``BACKENDS``: name -> loader). kvflow and HF load in this process;
the peers (vLLM, llama.cpp) need package sets of their own, so each runs the same prompt plan in
a worker under its own interpreter (``kvflow.bench.peers``) with the same timing loop.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kvflow.bench.cpu_idle import wait_for_idle_cpu
from kvflow.bench.limits import MachineLimits, measure_limits
from kvflow.bench.make_model import llama_param_count, to_torch_dtype
from kvflow.bench.shared_prefix_workloads import SHARED_PREFIX_WORKLOADS, SharedPrefixSizes, make_batch
from kvflow.core.prefix_tree import plan_prefix_groups
from kvflow.gguf_config import hf_config_from_gguf, is_gguf_path, read_gguf
from kvflow.model.loader import release_freed_heap

WORKLOADS: tuple[str, ...] = ("offline", "single", *SHARED_PREFIX_WORKLOADS)
#: The block size the prefix plan of a backend that reports none is computed with (kvflow's default).
DEFAULT_PLAN_BLOCK_SIZE = 16

#: Output lengths of one generate call: one for every prompt, or one per prompt.
MaxTokens = int | Sequence[int]


def per_prompt(max_tokens: MaxTokens, n: int) -> list[int]:
    """``max_tokens`` as one length per prompt."""
    return [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)


class BackendUnavailable(RuntimeError):
    """A backend is known but cannot run here (package missing or engine not importable)."""


class Backend(Protocol):
    """A loaded engine: greedy-decode token-id prompts for exactly ``max_tokens`` tokens (one
    length for all, or one per prompt)."""

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: MaxTokens) -> list[list[int]]:
        """Return the generated token ids of each prompt, in input order."""
        ...

    def close(self) -> None:
        """Release the model and its memory before the next backend loads."""
        ...


#: ``loader(model_dir, dtype, engine_kwargs) -> Backend``; it raises BackendUnavailable when the
#: package it needs is missing.
BackendLoader = Callable[[Path, str, Mapping[str, Any]], Backend]


class _HFBackend:
    """transformers ``generate``: the baseline every Python engine is compared with."""

    def __init__(self, model_dir: Path, dtype: str, engine_kwargs: Mapping[str, Any]) -> None:
        try:
            import transformers
            from transformers import AutoModelForCausalLM
        except ImportError as e:  # pragma: no cover - transformers is a kvflow dependency
            raise BackendUnavailable(f"backend 'hf' needs transformers: {e}") from e
        transformers.utils.logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=to_torch_dtype(dtype), **dict(engine_kwargs)
        ).eval()
        # ignore_eos semantics: no EOS at all, rather than min_new_tokens masking EOS out of the
        # logits, so greedy choices are the plain argmax that the other backends make.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: MaxTokens) -> list[list[int]]:
        """One batched ``generate`` call; prompts of unequal length are left-padded. Per-prompt
        lengths: every row decodes to the longest and is cut (``generate`` has one length), so HF
        computes more tokens than it is credited with."""
        lengths = per_prompt(max_tokens, len(prompts))
        if len(set(lengths)) > 1:
            self.report_extra = {"hf_note": "one batched generate to the longest max_tokens; rows cut"}
        max_tokens = max(lengths)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
            )
        return [row[:n] for row, n in zip(out[:, width:].tolist(), lengths)]

    def close(self) -> None:
        """Drop the model."""
        del self.model


class _KVFlowBackend:
    """kvflow's offline API (``kvflow.LLM``)."""

    def __init__(self, model_dir: Path, dtype: str, engine_kwargs: Mapping[str, Any]) -> None:
        try:
            from kvflow.llm import LLM
            from kvflow.sampling_params import SamplingParams
        except ImportError as e:
            raise BackendUnavailable(f"backend 'kvflow' cannot import kvflow.LLM: {e}") from e
        self._sampling_params = SamplingParams
        self.llm = LLM(model=str(model_dir), dtype=dtype, **dict(engine_kwargs))
        self._load_args = (model_dir, dtype, dict(engine_kwargs))
        self._kv = self._watch_kv_blocks()

    def _watch_kv_blocks(self) -> Any:
        """The engine core's KV cache manager (its `peak_used_blocks`, counted at allocation, gives the
        peak of blocks held during each call); None where the engine core is not in this process."""
        return getattr(getattr(self.llm.engine, "core", None), "kv", None)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: MaxTokens) -> list[list[int]]:
        """One ``LLM.generate`` call over all prompts (one ``SamplingParams`` per prompt when the
        lengths differ)."""
        lengths = per_prompt(max_tokens, len(prompts))
        make = self._sampling_params
        if len(set(lengths)) == 1:
            params: Any = make(max_tokens=lengths[0], temperature=0.0, ignore_eos=True)
        else:
            params = [make(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        if self._kv is not None:
            self._kv.reset_peak()
        stats = self._kv.stats if self._kv is not None else None
        queried, hits = (stats.queried_tokens, stats.hit_tokens) if stats is not None else (0, 0)
        outs = self.llm.generate([list(p) for p in prompts], params, use_tqdm=False)
        if self._kv is not None:
            self.call_stats = {
                "peak_kv_blocks": self._kv.peak_used_blocks,
                "peak_measured": "the engine's peak_used_blocks",
                "kv_blocks": self._kv.num_blocks,
                "block_size": self._kv.block_size,
                "prefix_queried_tokens": stats.queried_tokens - queried if stats is not None else None,
                "prefix_hit_tokens": stats.hit_tokens - hits if stats is not None else None,
            }  # fmt: skip
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        """Check the optimised path (after the peak memory was read), then drop the engine."""
        from kvflow.bench.fast_path_check import check_fast_path, fast_path_active

        fast_path = fast_path_active(self.llm)
        if fast_path:
            vocab = self.llm.engine.core.runner.model_config.vocab_size
            prompts = make_prompts(4, 32, vocab, 0, _CHECK_STREAM)
            fast = self.generate(prompts, 16)
        del self.llm
        gc.collect()  # free the fast engine before the plain one loads
        if fast_path:
            model_dir, dtype, engine_kwargs = self._load_args
            checks = check_fast_path(model_dir, dtype, engine_kwargs, prompts, fast)
            self.report_extra = {"fast_path_checks": [c.to_dict() for c in checks]}


@dataclass
class PromptPlan:
    """Every generate call of one run, in order: warm-up, TTFT probes (single only), timed repeats.

    Built once by the parent so in-process backends and peer workers get the very same ids.
    """

    warmup: list[list[int]] | None  # None: no warm-up call
    warmup_tokens: int
    probes: list[list[list[int]]]  # one 1-prompt batch per repeat, each generating 1 token
    timed: list[list[list[int]]]  # one batch per repeat, each generating output_len tokens
    output_len: int  # shared-prefix workloads: the longest of timed_max_tokens
    # Shared-prefix workloads: per repeat, each prompt's own output length (None: output_len).
    timed_max_tokens: list[list[int]] | None = None

    def max_tokens(self, repeat: int) -> MaxTokens:
        """What timed call ``repeat`` generates."""
        return self.output_len if self.timed_max_tokens is None else self.timed_max_tokens[repeat]


@dataclass
class Measurement:
    """What one backend's timed section produced; ``run_throughput`` turns it into the report."""

    load_s: float
    walls: list[float]
    ttfts: list[float]
    outputs: list[list[int]]  # of repeat 0
    cpu_util: float
    peak_rss_mib: float
    peak_rss_scope: str  # "run", "process" or "process tree" (a peer worker and its children)
    load_avg: float
    idle_before: float | None
    threads: int
    loaded_rss_mib: float | None = None  # resident right after loading (same scope as the peak)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the peer's interpreter and version


class PeerBackend:
    """A peer engine measured out of process by ``kvflow.bench.peers`` (its own interpreter).

    Not a loader: ``run_throughput`` hands it the whole prompt plan, since a worker that loaded
    the model for every generate call would time the load.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def measure(
        self, model_dir: Path, dtype: str, engine_kwargs: Mapping[str, Any], plan: PromptPlan,
        *, python: str | None, seed: int, wait_idle_s: float,
    ) -> Measurement:  # fmt: skip
        """Run ``plan`` in a worker; raises BackendUnavailable when the peer is not installed."""
        from kvflow.bench.peers import measure_peer

        return measure_peer(
            self.name, model_dir, dtype, engine_kwargs, plan, python=python, seed=seed,
            threads=torch.get_num_threads(), wait_idle_s=wait_idle_s,
        )  # fmt: skip


BACKENDS: dict[str, BackendLoader | PeerBackend] = {
    "kvflow": _KVFlowBackend,
    "hf": _HFBackend,
    "vllm": PeerBackend("vllm"),
    "llamacpp": PeerBackend("llamacpp"),
}


def get_backend(name: str) -> BackendLoader | PeerBackend:
    """The loader for ``name``, with the list of known backends when it is unknown."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}"
        ) from None


#: Prompt streams of one seed: timed repeat r uses stream r, so no timed call ever sees a prompt
#: an earlier call (warm-up, TTFT probe, previous repeat) could have left in a prefix cache.
_TTFT_STREAM = 1000
_WARMUP_STREAM = 2000
_CHECK_STREAM = 3000  # the fast-path check's prompts


def make_prompts(
    num_prompts: int, input_len: int, vocab_size: int, seed: int, stream: int = 0
) -> list[list[int]]:
    """Seeded random token ids in [100, vocab_size - 100): the same for every backend.

    The margins keep clear of special tokens at the start of a vocabulary and of any added
    tokens at its end. ``stream`` picks an independent prompt set of the same seed.
    """
    if vocab_size <= 200:
        raise ValueError(f"vocab_size {vocab_size} too small for ids in [100, vocab_size - 100)")
    rng = np.random.default_rng([seed, stream])
    ids = rng.integers(100, vocab_size - 100, size=(num_prompts, input_len), dtype=np.int64)
    return ids.tolist()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a run's peak excludes earlier backends."""
    gc.collect()
    release_freed_heap()  # first, or the freed heap counts towards the next peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mib(key: str) -> float | None:
    """A /proc/self/status size (e.g. "VmRSS:", "VmHWM:") in MiB; None where /proc has no status."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(key)), None)
    except OSError:
        return None


def resident_mib() -> float | None:
    """What this process holds now (VmRSS), in MiB; None where /proc has no status."""
    return _status_mib("VmRSS:")


def peak_rss_mib() -> float:
    """Peak resident set size in MiB: VmHWM where /proc has it, else getrusage (process-wide)."""
    peak = _status_mib("VmHWM:")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _load_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model directory (a GGUF file: the config its metadata gives), with a clear error
    when it is neither."""
    if is_gguf_path(model_dir):
        return hf_config_from_gguf(model_dir)
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json; make one with `kvflow bench make-model`"
        )
    return json.loads(path.read_text())


def _timed(fn: Callable[..., list[list[int]]], *args: object) -> tuple[float, list[list[int]]]:
    """Wall time of one call and its result."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def plan_prompts(
    workload: str, num_prompts: int, input_len: int, output_len: int, vocab_size: int,
    seed: int = 0, repeats: int = 1, warmup: bool = True, shared_prefix: SharedPrefixSizes | None = None,
) -> PromptPlan:  # fmt: skip
    """The prompt ids of every call of one run (see ``make_prompts`` streams).

    Shared-prefix workloads ignore ``num_prompts``, ``input_len`` and ``output_len``: their sizes
    are ``shared_prefix``'s; the warm-up is 4 requests of another batch of the same workload."""
    if workload in SHARED_PREFIX_WORKLOADS:
        sizes = (shared_prefix or SharedPrefixSizes()).resolve(workload)
        batches = [make_batch(workload, sizes, vocab_size, seed, r) for r in range(repeats)]
        warm = make_batch(workload, sizes, vocab_size, seed, _WARMUP_STREAM).prompts[:4] if warmup else None
        return PromptPlan(
            warmup=warm, warmup_tokens=4, probes=[], timed=[b.prompts for b in batches],
            output_len=max(max(b.max_tokens) for b in batches), timed_max_tokens=[b.max_tokens for b in batches],
        )  # fmt: skip
    n = num_prompts if workload == "offline" else 1
    return PromptPlan(
        warmup=make_prompts(min(4, n), input_len, vocab_size, seed, _WARMUP_STREAM) if warmup else None,
        warmup_tokens=min(4, output_len),
        probes=[make_prompts(1, input_len, vocab_size, seed, _TTFT_STREAM + r) for r in range(repeats)]
        if workload == "single"
        else [],
        timed=[make_prompts(n, input_len, vocab_size, seed, r) for r in range(repeats)],
        output_len=output_len,
    )


def _measure_in_process(
    loader: BackendLoader, model_dir: Path, dtype: str, engine_kwargs: Mapping[str, Any],
    plan: PromptPlan, seed: int, wait_idle_s: float,
) -> Measurement:  # fmt: skip
    """Load the engine here and time the plan's calls (``kvflow.bench.peers.worker`` mirrors this)."""
    rss_per_run = reset_peak_rss()
    call_stats: list[dict[str, Any]] = []
    start = time.perf_counter()
    engine = loader(model_dir, dtype, dict(engine_kwargs))
    load_s = time.perf_counter() - start
    loaded_rss = resident_mib()
    try:
        torch.manual_seed(seed)
        if plan.warmup is not None:
            engine.generate(plan.warmup, plan.warmup_tokens)
        idle_before = wait_for_idle_cpu(wait_idle_s) if wait_idle_s > 0 else None
        load_avg = os.getloadavg()[0]
        cpu0, section0 = _cpu_seconds(), time.perf_counter()
        ttfts = [_timed(engine.generate, probe, 1)[0] for probe in plan.probes]
        walls: list[float] = []
        outputs: list[list[int]] = []  # of repeat 0: the set every backend is compared on
        for r, prompts in enumerate(plan.timed):
            wall, out = _timed(engine.generate, prompts, plan.max_tokens(r))
            walls.append(wall)
            outputs = out if r == 0 else outputs
            if getattr(engine, "call_stats", None) is not None:
                call_stats.append(engine.call_stats)
        cpu_util = (_cpu_seconds() - cpu0) / (
            (time.perf_counter() - section0) * torch.get_num_threads()
        )
        peak_rss = peak_rss_mib()
    finally:
        engine.close()
        extra = dict(getattr(engine, "report_extra", {}))
        if call_stats:  # kvflow: KV blocks and prefix-cache hits of each timed call
            extra["kv"] = {"kv_blocks": call_stats[0]["kv_blocks"], "block_size": call_stats[0]["block_size"],
                           "peak_kv_blocks": max(c["peak_kv_blocks"] for c in call_stats),
                           "peak_kv_blocks_all": [c["peak_kv_blocks"] for c in call_stats],
                           "peak_measured": call_stats[0]["peak_measured"],
                           "prefix_hit_tokens_all": [c["prefix_hit_tokens"] for c in call_stats],
                           "prefix_queried_tokens_all": [c["prefix_queried_tokens"] for c in call_stats]}
        del engine
        gc.collect()
    return Measurement(
        load_s=load_s, walls=walls, ttfts=ttfts, outputs=outputs, cpu_util=cpu_util,
        peak_rss_mib=peak_rss, peak_rss_scope="run" if rss_per_run else "process", loaded_rss_mib=loaded_rss,
        load_avg=load_avg, idle_before=idle_before, threads=torch.get_num_threads(), extra=extra,
    )  # fmt: skip


def run_throughput(
    model_dir: Path | str,
    backend: str = "kvflow",
    workload: str = "offline",
    num_prompts: int = 64,
    input_len: int = 128,
    output_len: int = 128,
    dtype: str = "bfloat16",
    seed: int = 0,
    warmup: bool = True,
    repeats: int = 1,
    engine_kwargs: Mapping[str, Any] | None = None,
    limits: MachineLimits | None = None,
    wait_idle_s: float = 0.0,
    python: Mapping[str, str] | None = None,
    shared_prefix: SharedPrefixSizes | None = None,
) -> dict[str, Any]:
    """Load ``backend``, run ``workload`` and return its measurements as a dict.

    offline: all ``num_prompts`` prompts in one generate call; single: one prompt (batch of 1),
    plus a 1-token call to split time-to-first-token from per-token decode time. Only generate
    calls are timed (not model load); with ``repeats`` > 1 the median wall time is reported.
    Every call gets fresh prompts (see ``make_prompts`` streams), so prefix caching cannot turn
    a repeat into a cache hit.
    ``limits`` defaults to a fresh measurement of this machine (cached per process). With
    ``wait_idle_s`` > 0 the timed part first waits up to that long for idle CPUs.
    ``python[backend]`` is the interpreter of a peer backend's worker (default: its
    ``KVFLOW_<NAME>_PYTHON`` variable, else this interpreter).
    fewshot / docqa / noshare: one generate call over the workload's batch (sizes from
    ``shared_prefix``; ``num_prompts``, ``input_len`` and ``output_len`` unused), each request with
    its own ``max_tokens``; the report adds ``prefix_plan`` (R_saving of the one-level plan and of
    a multi-level tree, at the engine's block size) and, for kvflow, ``kv`` (peak blocks held, the
    budget, prefix-cache hits).
    Returned ``token_ids`` hold the generated ids, for agreement checks between backends.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
    if output_len < 1 or input_len < 1 or num_prompts < 1 or repeats < 1:
        raise ValueError("num_prompts, input_len, output_len and repeats must be positive")
    model_dir = Path(model_dir)
    entry = get_backend(backend)
    cfg = _load_model_config(model_dir)
    limits = limits if limits is not None else measure_limits()
    shared = workload in SHARED_PREFIX_WORKLOADS
    plan = plan_prompts(workload, num_prompts if workload == "offline" else 1, input_len, output_len,
                        int(cfg["vocab_size"]), seed, repeats, warmup, shared_prefix)
    n = len(plan.timed[0])
    kwargs = dict(engine_kwargs or {})
    if isinstance(entry, PeerBackend):
        m = entry.measure(
            model_dir, dtype, kwargs, plan, python=(python or {}).get(backend), seed=seed,
            wait_idle_s=wait_idle_s,
        )  # fmt: skip
    else:
        m = _measure_in_process(entry, model_dir, dtype, kwargs, plan, seed, wait_idle_s)
    outputs = m.outputs

    expected = per_prompt(plan.max_tokens(0), n)
    if len(outputs) != n or [len(o) for o in outputs] != expected or len(m.walls) != repeats:
        lengths = sorted({len(o) for o in outputs})
        raise RuntimeError(
            f"backend {backend!r} returned {len(outputs)} outputs of lengths {lengths} "
            f"({len(m.walls)} timed runs); expected {n} of exactly "
            f"{output_len if not shared else 'their own max_tokens'} tokens ({repeats} timed runs)"
        )

    params = llama_param_count(cfg)
    weight_bytes = params * to_torch_dtype(dtype).itemsize
    if is_gguf_path(model_dir):  # the file's tensors as stored (quantised blocks), what a decode step reads
        weight_bytes = sum(int(t.n_bytes) for t in read_gguf(model_dir).tensors)
    walls = m.walls
    wall_s = statistics.median(walls)
    out_tokens, in_tokens = sum(expected), sum(len(p) for p in plan.timed[0])
    result: dict[str, Any] = {
        "backend": backend,
        "workload": workload,
        "model": str(model_dir),
        "params": params,
        "num_prompts": n,
        "input_len": input_len if not shared else in_tokens / n,  # shared-prefix workloads: the mean
        "output_len": output_len if not shared else out_tokens / n,
        "dtype": dtype,
        "seed": seed,
        "repeats": repeats,
        "engine_kwargs": kwargs,
        "load_s": m.load_s,
        "wall_s": wall_s,
        "wall_s_all": walls,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "output_tok_s": out_tokens / wall_s,
        "total_tok_s": (out_tokens + in_tokens) / wall_s,
        "peak_rss_mib": m.peak_rss_mib,
        "peak_rss_scope": m.peak_rss_scope,
        "loaded_rss_mib": m.loaded_rss_mib,
        "cpu_util": m.cpu_util,
        "load_avg_1m_before": m.load_avg,
        "cpu_idle_before": m.idle_before,
        "torch_threads": m.threads,
        "token_ids": outputs,
        "token_ids_sha256": hashlib.sha256(json.dumps(outputs).encode()).hexdigest(),
        **m.extra,
    }
    info = (m.extra.get("peer") or {}).get("info") or {}
    if "kv" not in result and isinstance(info.get("num_gpu_blocks"), int):  # vLLM: its budget, no peak
        result["kv"] = {"kv_blocks": info["num_gpu_blocks"], "block_size": info.get("block_size"),
                        "peak_kv_blocks": None, "peak_measured": "not measured (vLLM exposes no peak here)"}
    if shared:
        result["shared_prefix_sizes"] = (shared_prefix or SharedPrefixSizes()).resolve(workload).__dict__
        # The prefix plan at the block size the engine shares KV in (a backend that reports none:
        # kvflow's default); same structure in every repeat, so repeat 0's.
        bs = (m.extra.get("kv") or {}).get("block_size") or (m.extra.get("peer") or {}).get("block_size")
        prefix = plan_prefix_groups(plan.timed[0], bs or DEFAULT_PLAN_BLOCK_SIZE)
        result["prefix_plan"] = {
            "block_size": prefix.block_size, "block_size_from": "engine" if bs else "kvflow default",
            "saving_ratio": prefix.saving_ratio, "optimal_saving_ratio": prefix.optimal_saving_ratio,
            "logical_prefix_tokens": prefix.logical_prefix_tokens,
            "processed_prefix_tokens": prefix.processed_prefix_tokens,
            "optimal_processed_tokens": prefix.optimal_processed_tokens,
            "groups": sum(len(g.members) > 1 for g in prefix.groups),
            "singletons": sum(len(g.members) == 1 for g in prefix.groups),
        }  # fmt: skip
    if workload == "offline" or shared:
        # Prompt and output tokens each cost 2·params FLOPs; the output-token ceiling is the
        # output share of the token ceiling. Shared prefixes: the tokens a multi-level tree still
        # computes (an engine that shares them can approach this ceiling, never pass it).
        if shared:
            in_tokens -= result["prefix_plan"]["logical_prefix_tokens"] - prefix.optimal_processed_tokens
        ceiling = limits.tokens_per_s_ceiling(params, dtype) * out_tokens / (out_tokens + in_tokens)
        result["limit"] = {"output_tok_s_ceiling": ceiling}
        result["fraction_of_limit"] = result["output_tok_s"] / ceiling
    else:
        ttft_s = statistics.median(m.ttfts)
        decode_s = (wall_s - ttft_s) / (output_len - 1) if output_len > 1 else ttft_s
        floor_s = limits.decode_step_floor_s(weight_bytes)
        result["ms_per_token"] = wall_s / output_len * 1e3
        result["ttft_ms"] = ttft_s * 1e3
        result["decode_ms_per_token"] = decode_s * 1e3
        result["limit"] = {"decode_step_floor_ms": floor_s * 1e3, "weight_bytes": weight_bytes}
        result["fraction_of_limit"] = floor_s / decode_s if decode_s > 0 else float("nan")
    return result
