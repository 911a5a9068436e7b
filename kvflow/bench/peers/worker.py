"""Run one peer engine (vLLM or llama.cpp) through a kvflow throughput plan, out of process.

Executed by path with the peer's own interpreter, ``python worker.py JOB.json RESULT.json``, so
it imports only the standard library and the peer package: vLLM's CPU build pins a package set
kvflow's environment cannot share. The timing loop mirrors ``_measure_in_process`` in
``kvflow.bench.throughput``; results go to a file because peers log to stdout.
Exit status: 0 done, 3 peer not importable (result says why), 1 any other failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is this directory: drop it so no sibling can shadow a real package.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

EXIT_UNAVAILABLE = 3
#: The package each backend imports (what "not installed" means).
PACKAGES = {"vllm": "vllm", "llamacpp": "llama_cpp"}


class _VLLMEngine:
    """``vllm.LLM`` fed token ids; greedy, ``ignore_eos``; ids out, so no tokenizer by default."""

    def __init__(self, job: dict[str, Any]) -> None:
        kwargs = dict(job["engine_kwargs"])
        kv_gib = kwargs.pop("kv_cache_memory", None)  # GiB, the name kvflow uses for its budget
        if kv_gib is not None:
            # The env var wins over kv_cache_memory_bytes on CPU, so it must not be set.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            kwargs["kv_cache_memory_bytes"] = int(float(kv_gib) * 2**30)
        elif "kv_cache_memory_bytes" not in kwargs:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        cpus = sorted(os.sched_getaffinity(0))
        if job["threads"] < len(cpus):  # vLLM binds one OpenMP thread per listed CPU
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus[: job["threads"]])))
        from vllm import LLM, SamplingParams

        kwargs.setdefault("skip_tokenizer_init", True)
        kwargs.setdefault("seed", job["seed"])
        self._params = SamplingParams
        self._detokenize = not kwargs["skip_tokenizer_init"]
        self.llm = LLM(model=job["model"], dtype=job["dtype"], **kwargs)

    def generate(self, prompts: list[list[int]], max_tokens: int | list[int]) -> list[list[int]]:
        """One ``LLM.generate`` call over all prompts, like kvflow's backend (a list of sampling
        params, one per prompt, when their lengths differ)."""
        lengths = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)

        def make(n: int) -> Any:
            return self._params(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=self._detokenize)

        params = make(lengths[0]) if len(set(lengths)) == 1 else [make(n) for n in lengths]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def info(self) -> dict[str, Any]:
        """The cache settings the engine runs with (prefix caching is on by default in vLLM v1)."""
        cache = getattr(getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
        names = ("block_size", "enable_prefix_caching", "num_gpu_blocks", "num_cpu_blocks", "cpu_kvcache_space_bytes")
        return {k: getattr(cache, k) for k in names if isinstance(getattr(cache, k, None), (int, float, bool))}

    def close(self) -> None:
        """Stop the engine-core processes (the parent kills any the worker leaves behind)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm


class _LlamaCppEngine:
    """``llama_cpp.Llama`` on a GGUF file; prompts run one after another (its API has no batch)."""

    def __init__(self, job: dict[str, Any]) -> None:
        from llama_cpp import Llama

        kwargs = dict(job["engine_kwargs"])
        kwargs.setdefault("n_threads", job["threads"])
        kwargs.setdefault("n_threads_batch", job["threads"])
        kwargs.setdefault("n_ctx", job["context_len"])
        kwargs.setdefault("seed", job["seed"])
        kwargs.setdefault("verbose", False)
        self.llm = Llama(model_path=job["gguf"], **kwargs)

    def generate(self, prompts: list[list[int]], max_tokens: int | list[int]) -> list[list[int]]:
        """Greedy (temp 0) for exactly ``max_tokens`` (one for all, or per prompt): ``Llama.generate``
        never stops at EOS."""
        lengths = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        outs = []
        for prompt, limit in zip(prompts, lengths):
            self.llm.reset()  # no prefix reuse from the previous prompt, as for every backend
            tokens: list[int] = []
            gen = self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True)
            for token in gen:
                tokens.append(int(token))
                if len(tokens) >= limit:
                    break
            gen.close()
            outs.append(tokens)
        return outs

    def close(self) -> None:
        """Free the model and context."""
        close = getattr(self.llm, "close", None)
        if callable(close):
            close()
        del self.llm


ENGINES = {"vllm": _VLLMEngine, "llamacpp": _LlamaCppEngine}


def tree_pids(root: int | None = None) -> list[int]:
    """`root` (default: this process) and all its live descendants (vLLM runs its engine core in
    child processes). Standard library only: this file runs in the peers' own environments, and
    kvflow.bench.edge_limits uses it too."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [os.getpid() if root is None else root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _tree_cpu_seconds() -> float:
    """User + system CPU time of the live process tree."""
    total = 0
    for pid in tree_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def _tree_rss_mib(key: str = "VmHWM:") -> float:
    """Sum over each live process of its peak RSS (VmHWM: an upper bound on the tree's peak) or, with
    key="VmRSS:", of what it holds now."""
    total_kib = 0
    for pid in tree_pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                total_kib += next((int(ln.split()[1]) for ln in f if ln.startswith(key)), 0)
        except (OSError, ValueError):
            continue
    return total_kib / 1024


def _load_cpu_idle() -> Any:
    """kvflow.bench.cpu_idle, loaded by path: this interpreter cannot import kvflow itself."""
    path = Path(__file__).resolve().parent.parent / "cpu_idle.py"
    spec = importlib.util.spec_from_file_location("kvflow_bench_cpu_idle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(engine: Any, prompts: list[list[int]], max_tokens: int | list[int]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = engine.generate(prompts, max_tokens)
    return time.perf_counter() - start, out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load the engine, run the plan (warm-up, TTFT probes, timed repeats) and measure it."""
    plan = job["plan"]
    start = time.perf_counter()
    engine = ENGINES[job["backend"]](job)
    load_s = time.perf_counter() - start
    loaded_rss = _tree_rss_mib("VmRSS:")
    try:
        if plan["warmup"] is not None:
            engine.generate(plan["warmup"], plan["warmup_tokens"])
        idle_before = _load_cpu_idle().wait_for_idle_cpu(job["wait_idle_s"]) if job["wait_idle_s"] > 0 else None
        load_avg = os.getloadavg()[0]
        cpu0, section0, wall0 = _tree_cpu_seconds(), time.perf_counter(), time.time()
        ttfts = [_timed(engine, probe, 1)[0] for probe in plan["probes"]]
        walls, outputs = [], []
        per_prompt = plan.get("timed_max_tokens")  # shared-prefix workloads: each request's own
        for r, prompts in enumerate(plan["timed"]):
            wall, out = _timed(engine, prompts, per_prompt[r] if per_prompt else plan["output_len"])
            walls.append(wall)
            outputs = out if r == 0 else outputs
        section_s, cpu_s = time.perf_counter() - section0, _tree_cpu_seconds() - cpu0
        section_wall = [wall0, time.time()]  # wall-clock bounds (energy counters read by the parent)
        peak_rss = _tree_rss_mib()
        info = engine.info() if hasattr(engine, "info") else {}
    finally:
        engine.close()
    return {
        "load_s": load_s, "walls": walls, "ttfts": ttfts, "outputs": outputs,
        "cpu_util": cpu_s / (section_s * job["threads"]), "peak_rss_mib": peak_rss, "loaded_rss_mib": loaded_rss,
        "load_avg": load_avg, "idle_before": idle_before, "pid": os.getpid(), "info": info,
        "cpu_s": cpu_s, "section_s": section_s, "section_wall": section_wall,
    }  # fmt: skip


def main(argv: list[str]) -> int:
    """``worker.py JOB RESULT``: read the job, write ``{"ok": ...}``, ``{"unavailable": ...}`` or
    ``{"error": ...}`` to RESULT."""
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    package = PACKAGES[job["backend"]]
    try:
        module = importlib.import_module(package)
    except Exception as e:  # a broken install (missing dependency) is as unusable as none
        result_path.write_text(json.dumps({"unavailable": f"import {package} failed: {type(e).__name__}: {e}"}))
        return EXIT_UNAVAILABLE
    try:
        result = run_job(job)
    except BaseException as e:
        result_path.write_text(json.dumps({"error": "".join(traceback.format_exception(e))}))
        return 1
    result["version"] = str(getattr(module, "__version__", "unknown"))
    result_path.write_text(json.dumps({"ok": result}))
    return 0


if __name__ == "__main__":  # vLLM's worker processes re-import __main__: keep work under the guard
    sys.exit(main(sys.argv[1:]))
