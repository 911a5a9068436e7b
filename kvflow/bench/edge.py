"""``kvflow bench edge``: a model served on what a small box has — N cores and M GiB — with the footprint
figures of "GenAI on the edge" (a Raspberry Pi 5 cluster under K3s): tokens/s, TTFT, end-to-end
latency, CPU% and RAM% of the limit, peak RSS and energy, for kvflow and llama.cpp under the same
limits in the same run.

Every (limit, model, format, engine) is one child process started under the limits
(`kvflow.bench.edge_limits`: CPU affinity to the first N cores and N threads; a memory cgroup, else an
RSS watchdog), so a load, a peak or an OOM kill is that engine's alone. Both engines read the same GGUF
file, written once per model and format by kvflow's own writer (bf16: the checkpoint's weights cast;
q8_0/q4_0: `kvflow quantize`'s blocks), and get the same token ids. The workload is the single stream
of ../shared/BENCHMARKS.md: one `input_len`-token prompt, `output_len` greedy tokens with EOS ignored,
timed `repeats` times after a warm-up, plus one TTFT probe (a one-token generation) per repeat; both
engines run it through the peers' timing loop (`kvflow.bench.peers.worker.run_job`).

Figures per run, medians over repeats: ``tokens_per_s`` = output tokens / end-to-end time of a request
(so ``tokens_per_s * e2e_s == output_tokens``), ``ttft_s``, ``e2e_s``, ``tpot_ms`` (time after the
first token per further token), ``cpu_pct`` (process-tree CPU time over the timed section, as a share
of the cores allowed), ``ram_pct`` (peak RSS of the process tree over the memory limit), ``peak_rss_mib``
and, for a cgroup, its own peak (page cache included). Energy is RAPL's package counters over the timed
section where the machine exposes them (whole package: other processes count too); else an estimate,
labelled so: CPU-seconds of the timed section times ``watts_per_core``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvflow.bench.edge_limits import (
    ProcessMonitor,
    Rapl,
    child_setup,
    memory_limit,
    pick_cpus,
)

ENGINES = ("kvflow", "llamacpp")
FORMATS = ("bf16", "q8_0", "q4_0")
#: Per busy core, for the labelled estimate where RAPL is not readable: a server core's share of its
#: package power under load (e.g. 360 W over 96 cores for a current EPYC).
DEFAULT_WATTS_PER_CORE = 3.75
#: The paper's Raspberry Pi 5 (4 Cortex-A76 cores, 8 GiB): what a K3s node of their cluster had.
PI5 = {"cores": 4, "memory_gib": 8.0}


@dataclass(frozen=True)
class EdgeLimit:
    """Cores and GiB of memory for one child."""

    cores: int
    memory_gib: float

    @classmethod
    def parse(cls, text: str) -> EdgeLimit:
        """``"1x2"`` -> 1 core, 2 GiB (also ``1c2g``, ``1:2``)."""
        for sep in ("x", ":", "c"):
            if sep in text:
                cores, gib = text.split(sep, 1)
                try:
                    return cls(int(cores), float(gib.rstrip("gGiB")))
                except ValueError:
                    break
        raise ValueError(f"a limit is CORESxGIB (e.g. 1x2: one core, 2 GiB), got {text!r}")

    def __post_init__(self) -> None:
        if self.cores < 1 or self.memory_gib <= 0:
            raise ValueError(f"a limit needs >= 1 core and > 0 GiB, got {self.cores} and {self.memory_gib}")

    @property
    def label(self) -> str:
        return f"{self.cores} core{'s' if self.cores > 1 else ''} / {self.memory_gib:g} GiB"

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


@dataclass(frozen=True)
class ModelCase:
    """A model (name and directory) in one weight format."""

    name: str
    path: Path
    fmt: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.fmt}"


def parse_model(spec: str) -> tuple[str, Path]:
    """``tiny`` (the shipped model), ``NAME=DIR`` or ``DIR`` (named by its folder)."""
    from kvflow.assets import default_model_path

    if spec == "tiny":
        return "tiny", default_model_path()
    name, eq, path = spec.partition("=")
    if not eq:
        name, path = Path(spec).name, spec
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model {spec!r}: {path} is not a model directory (no config.json); make one with "
                         "`kvflow bench make-model --shape 135m --out DIR`")
    return name, Path(path)


# ------------------------------------------------------------------------------------------ models
def gguf_for(case: ModelCase, cache_dir: Path) -> Path:
    """The GGUF file both engines read for `case`, written once (remade when the checkpoint is newer)."""
    import torch

    cache_dir.mkdir(parents=True, exist_ok=True)
    where = hashlib.sha256(str(case.path.resolve()).encode()).hexdigest()[:8]
    out = cache_dir / f"{case.name}-{where}.{case.fmt}.gguf"
    newest = max(p.stat().st_mtime for p in case.path.iterdir())
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    tmp = out.with_suffix(".tmp")
    if case.fmt == "bf16":
        from safetensors import safe_open

        from kvflow.model.gguf.writer import write_gguf
        from kvflow.model.loader import safetensors_files

        weights: dict[str, torch.Tensor] = {}
        for file in safetensors_files(case.path):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    weights[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
        write_gguf(tmp, case.path, weights, name=case.name)
    else:
        from kvflow.model.quant.quantize_model import quantize_checkpoint

        quantize_checkpoint(case.path, case.fmt, gguf_path=tmp)
    tmp.replace(out)
    return out


def vocab_size(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["vocab_size"])


# ------------------------------------------------------------------------------------------ one run
def _job(engine: str, gguf: Path, limit: EdgeLimit, plan: dict[str, Any], seed: int, context_len: int,
         kv_cache_gib: float, wait_idle_s: float = 0.0, quant_activations: str = "exact") -> dict[str, Any]:
    job: dict[str, Any] = {"backend": engine, "threads": limit.cores, "seed": seed, "plan": plan,
                           "wait_idle_s": wait_idle_s}
    if engine == "kvflow":
        kwargs = {"kv_cache_memory": kv_cache_gib, "max_model_len": context_len, "max_num_seqs": 4,
                  "quant_activations": quant_activations}
        job.update(model=str(gguf), dtype="bfloat16", engine_kwargs=kwargs)
    else:
        job.update(gguf=str(gguf), context_len=context_len, engine_kwargs={})
    return job


def _command(engine: str, python: str | None) -> list[str]:
    if engine == "kvflow":
        return [sys.executable, "-m", "kvflow.bench.edge_worker"]
    from kvflow.bench.peers import WORKER, peer_python

    return [peer_python("llamacpp", python), str(WORKER)]


def drop_page_cache(path: Path) -> bool:
    """Evict `path` from the page cache (POSIX_FADV_DONTNEED after an fsync), so that the next run reads it
    again and its memory cgroup is charged for the pages: a cgroup charges a cached page to whoever read
    it first (the parent that wrote the GGUF), and a run mapping pages charged elsewhere could hold more
    than its limit resident without a kill. False where the kernel does not offer it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def run_limited(engine: str, case: ModelCase, gguf: Path, limit: EdgeLimit, plan: dict[str, Any], *,
                seed: int = 0, context_len: int, kv_cache_gib: float, python: str | None = None,
                limiter: str = "auto", rapl: Rapl | None = None, watts_per_core: float = DEFAULT_WATTS_PER_CORE,
                kvflow_isa: str | None = None, wait_idle_s: float = 0.0, timeout_s: float = 1800.0,
                quant_activations: str = "exact") -> dict[str, Any]:
    """One engine on one model under `limit`, in a child process; the run's figures (or why it failed).
    `kvflow_isa`: KVFLOW_CPU_ISA for kvflow's kernels (e.g. ``avx2``, the container image's build; None: as set).
    `quant_activations`: kvflow's arithmetic on quantised weights (exact, or q8: llama.cpp's int8 activation
    blocks; bf16 weights ignore it)."""
    from kvflow.model import cpu_kernels

    cpus = pick_cpus(limit.cores)
    env = dict(os.environ, OMP_NUM_THREADS=str(limit.cores), MKL_NUM_THREADS=str(limit.cores))
    if kvflow_isa is not None and engine == "kvflow":
        env[cpu_kernels.ISA_ENV] = kvflow_isa
    with tempfile.TemporaryDirectory(prefix="kvflow-edge-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        quant = quant_activations if case.fmt != "bf16" else "exact"
        job_path.write_text(json.dumps(_job(engine, gguf, limit, plan, seed, context_len, kv_cache_gib, wait_idle_s,
                                            quant)))
        mem = memory_limit(limit.memory_bytes, f"kvflow-edge-{os.getpid()}-{time.monotonic_ns()}", limiter)
        base = {"engine": engine, "model": case.name, "format": case.fmt, "gguf": str(gguf),
                "limit": asdict(limit), "limit_label": limit.label, "cpus": cpus, "memory_limiter": mem.method}
        if engine == "kvflow":
            base["kvflow_isa"] = env.get(cpu_kernels.ISA_ENV, "native")
            base["kvflow_quant_activations"] = quant
        base["cold_start"] = drop_page_cache(gguf)  # the model is read from disk, into this run's cgroup
        start = time.perf_counter()
        try:
            proc = subprocess.Popen([*_command(engine, python), str(job_path), str(result_path)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=child_setup(cpus, mem))
            monitor = ProcessMonitor(proc.pid, mem, rapl=rapl).start()
            try:
                _, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
            finally:
                monitor.stop()
            wall_s = time.perf_counter() - start
            killed, cgroup_peak = mem.killed(), mem.peak_bytes()
        finally:
            mem.close()
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    base.update(wall_s=wall_s, returncode=proc.returncode,
                cgroup_peak_mib=cgroup_peak / 2**20 if cgroup_peak is not None else None)
    if "ok" not in result:
        why = "killed by the memory limit" if killed else (result.get("error") or result.get("unavailable")
                                                            or (stderr or "").strip()[-2000:] or "no result")
        return {**base, "status": "oom-killed" if killed else "failed", "error": why}
    return {**base, "status": "ok", **summarise(result["ok"], limit, plan, monitor, watts_per_core)}


def summarise(r: dict[str, Any], limit: EdgeLimit, plan: dict[str, Any], monitor: ProcessMonitor | None = None,
              watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> dict[str, Any]:
    """The paper's figures from one worker result (medians over the repeats)."""
    output_tokens = len(r["outputs"][0])
    if output_tokens != plan["output_len"]:
        raise RuntimeError(f"the engine generated {output_tokens} tokens, not {plan['output_len']}")
    e2e = statistics.median(r["walls"])
    ttft = statistics.median(r["ttfts"])
    sampled = monitor.peak_rss_bytes / 2**20 if monitor is not None else 0.0
    peak_rss = max(r["peak_rss_mib"], sampled)
    section_tokens = len(r["ttfts"]) + output_tokens * len(r["walls"])
    joules, source = None, f"estimate: CPU-seconds x {watts_per_core:.2f} W per busy core (no readable RAPL counters)"
    if monitor is not None and r.get("section_wall"):
        joules = monitor.energy_between(*r["section_wall"])
        if joules is not None:
            source = "RAPL package counters (whole package, other processes included)"
    if joules is None:
        joules = r.get("cpu_s", r["cpu_util"] * r.get("section_s", sum(r["walls"]) + sum(r["ttfts"])) * limit.cores)
        joules *= watts_per_core
    return {
        "engine_version": r.get("version"), "info": r.get("info", {}),
        "load_s": r["load_s"], "output_tokens": output_tokens, "repeats": len(r["walls"]),
        "tokens_per_s": output_tokens / e2e, "e2e_s": e2e, "ttft_s": ttft,
        "tpot_ms": 1000 * (e2e - ttft) / max(1, output_tokens - 1),
        "walls": r["walls"], "ttfts": r["ttfts"],
        "cpu_pct": 100 * r["cpu_util"], "cpu_s": r.get("cpu_s"), "section_s": r.get("section_s"),
        "peak_rss_mib": peak_rss,
        "ram_pct": 100 * peak_rss * 2**20 / limit.memory_bytes,
        "energy_j": joules, "energy_j_per_token": joules / section_tokens, "energy_source": source,
        "tokens_per_s_per_core": output_tokens / e2e / limit.cores,
        "tokens_per_s_per_gib": output_tokens / e2e / limit.memory_gib,
        "load_avg": r.get("load_avg"), "idle_before": r.get("idle_before"),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ the bench
def make_plan(vocab: int, input_len: int, output_len: int, repeats: int, seed: int) -> dict[str, Any]:
    """The single-stream plan (ids from `kvflow.bench.throughput.plan_prompts`, as every backend gets)."""
    from kvflow.bench.throughput import plan_prompts

    p = plan_prompts("single", 1, input_len, output_len, vocab, seed=seed, repeats=repeats, warmup=True)
    return {"warmup": p.warmup, "warmup_tokens": p.warmup_tokens, "probes": p.probes, "timed": p.timed,
            "output_len": p.output_len}


def machine_info() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in _read("/proc/cpuinfo").splitlines() if ln.startswith("flags")), "")
    import torch

    from kvflow.model import cpu_kernels

    return {"cpu": model, "machine": platform.machine(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "avx512": " avx512f" in flags, "cpu_isa": cpu_kernels.cpu_isa(), "kernel_march": cpu_kernels.CFLAGS[1],
            "torch": torch.__version__, "memory_gib": _mem_total_gib()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _mem_total_gib() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return None


def run_edge(models: Sequence[tuple[str, Path]], formats: Sequence[str], limits: Sequence[EdgeLimit],
             engines: Sequence[str] = ENGINES, *, input_len: int = 128, output_len: int = 128, repeats: int = 2,
             seed: int = 0, python: str | None = None, limiter: str = "auto", kv_cache_gib: float | None = None,
             watts_per_core: float = DEFAULT_WATTS_PER_CORE, cache_dir: Path | None = None,
             kvflow_isa: str | None = None, wait_idle_s: float = 0.0, quant_activations: str = "exact",
             log: Any = print) -> dict[str, Any]:
    """Every engine on every model and format under every limit; the report (runs in the order made).
    `wait_idle_s`: each run waits up to this long for idle CPUs before its timed section (a shared machine);
    `quant_activations`: kvflow's arithmetic on q8_0/q4_0 weights (run_limited)."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for engine in engines:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    cache_dir = cache_dir or Path(os.environ.get("KVFLOW_CACHE", Path.home() / ".cache" / "kvflow")) / "edge"
    rapl = Rapl.find()
    skipped: dict[str, str] = {}
    if "llamacpp" in engines:
        from kvflow.bench.peers import check_peer, peer_python
        from kvflow.bench.throughput import BackendUnavailable

        try:
            check_peer("llamacpp", peer_python("llamacpp", python))
        except BackendUnavailable as e:
            skipped["llamacpp"] = str(e)
            log(f"llamacpp skipped: {str(e).splitlines()[0]}")
    if "kvflow" in engines:
        build_kernels(kvflow_isa, log)
    runs = []
    context_len = input_len + output_len + 16
    for name, path in models:
        plan = make_plan(vocab_size(path), input_len, output_len, repeats, seed)
        for fmt in formats:
            case = ModelCase(name, path, fmt)
            gguf = gguf_for(case, cache_dir)
            for limit in limits:
                kv = kv_cache_gib if kv_cache_gib is not None else min(0.25, limit.memory_gib / 8)
                for engine in engines:
                    if engine in skipped:
                        continue
                    run = run_limited(engine, case, gguf, limit, plan, seed=seed, context_len=context_len,
                                      kv_cache_gib=kv, python=python, limiter=limiter, rapl=rapl,
                                      watts_per_core=watts_per_core, kvflow_isa=kvflow_isa, wait_idle_s=wait_idle_s,
                                      quant_activations=quant_activations)
                    runs.append(run)
                    log(format_run(run))
    return {"benchmark": "edge", "machine": machine_info(), "rapl": [str(d) for d in rapl.domains] if rapl else None,
            "workload": {"input_len": input_len, "output_len": output_len, "repeats": repeats, "seed": seed,
                         "wait_idle_s": wait_idle_s},
            "skipped": skipped, "runs": runs, "ratios": ratios(runs)}


def build_kernels(isa: str | None = None, log: Any = print) -> None:
    """Compile kvflow's C++ kernels for `isa` before any limited run, outside the limits, as the container
    image does at build time: a child must load them, not count a compiler in its memory and time."""
    from kvflow.model import cpu_kernels

    env = dict(os.environ) if isa is None else {**os.environ, cpu_kernels.ISA_ENV: isa}
    code = ("from kvflow.model import cpu_kernels as c; from kvflow.model.quant import kernels as k; "
            "import sys; sys.exit(0 if c.load_extension() is not None and k.load_extension() is not None else 1)")
    if subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).returncode != 0:
        log("kvflow's C++ kernels did not build: its runs take the PyTorch modules")


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kvflow over llama.cpp per (model, format, limit): tokens/s (higher is better) and TTFT (lower)."""
    out = []
    ok = [r for r in runs if r["status"] == "ok"]
    for k in (r for r in ok if r["engine"] == "kvflow"):
        peer = next((r for r in ok if r["engine"] == "llamacpp" and
                     (r["model"], r["format"], r["limit"]) == (k["model"], k["format"], k["limit"])), None)
        if peer is not None:
            out.append({"model": k["model"], "format": k["format"], "limit_label": k["limit_label"],
                        "tokens_per_s_x": k["tokens_per_s"] / peer["tokens_per_s"],
                        "ttft_speedup_x": peer["ttft_s"] / k["ttft_s"]})
    return out


def format_run(r: dict[str, Any]) -> str:
    notes = [r["kvflow_isa"]] if r.get("kvflow_isa", "native") != "native" else []
    notes += ["q8 act"] if r.get("kvflow_quant_activations", "exact") != "exact" else []
    engine = r["engine"] + (f" ({', '.join(notes)})" if notes else "")
    head = f"{r['limit_label']:<16} {r['model'] + ' ' + r['format']:<14} {engine:<9}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['error'].splitlines()[-1] if r['error'] else ''}"
    return (f"{head} {r['tokens_per_s']:7.1f} tok/s  TTFT {1000 * r['ttft_s']:7.1f} ms  E2E {r['e2e_s']:6.2f} s  "
            f"CPU {r['cpu_pct']:5.1f}%  RAM {r['ram_pct']:5.1f}% (peak RSS {r['peak_rss_mib']:.0f} MiB)  "
            f"{r['energy_j_per_token']:.3f} J/token{' (est.)' if r['energy_source'].startswith('estimate') else ''}")


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    limiter = sorted({r["memory_limiter"].split(" (")[0] for r in report["runs"]})
    lines = [f"{m['cpu']} ({m['machine']}, AVX-512: {'yes' if m['avx512'] else 'no'}; kvflow kernels "
             f"{m['kernel_march']}); memory limit by {', '.join(limiter) or '-'}; energy: "
             + ("RAPL" if report["rapl"] else "estimated (no RAPL)")]
    lines += [format_run(r) for r in report["runs"]]
    for q in report["ratios"]:
        lines.append(f"kvflow / llama.cpp, {q['model']} {q['format']} at {q['limit_label']}: "
                     f"tokens/s {q['tokens_per_s_x']:.2f}x; TTFT speed (llama.cpp's TTFT / kvflow's) "
                     f"{q['ttft_speedup_x']:.2f}x")
    return "\n".join(lines)


def plot_edge(report: dict[str, Any], path: Path) -> Path:
    """Tokens/s and TTFT per model and limit, kvflow beside llama.cpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["runs"] if r["status"] == "ok"]
    groups = list(dict.fromkeys((r["model"] + " " + r["format"], r["limit_label"]) for r in ok))
    engines = [e for e in ENGINES if any(r["engine"] == e for r in ok)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(engines))
    for i, engine in enumerate(engines):
        for ax, key, scale in ((axes[0], "tokens_per_s", 1.0), (axes[1], "ttft_s", 1000.0)):
            values = []
            for label, limit in groups:
                run = next((r for r in ok if r["engine"] == engine and r["model"] + " " + r["format"] == label
                            and r["limit_label"] == limit), None)
                values.append(run[key] * scale if run else 0.0)
            bars = ax.bar([g + i * width for g in range(len(groups))], values, width, label=engine)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values], fontsize=7)
    axes[0].set_yscale("log")  # the shipped tiny runs ~30x faster than 135m
    for ax, title in ((axes[0], "output tokens/s (single stream, log scale)"), (axes[1], "TTFT (ms)")):
        ax.set_xticks([g + width * (len(engines) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{label}\n{limit}" for label, limit in groups], fontsize=7)
        ax.set_title(title)
        ax.legend()
    m = report["machine"]
    fig.suptitle(f"kvflow bench edge: {m['cpu']} limited by affinity and "
                 f"{sorted({r['memory_limiter'].split(' (')[0] for r in ok})[0] if ok else '-'}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_edge(report: dict[str, Any], out_dir: Path, command: str | None = None) -> list[Path]:
    """``edge.json`` (the report, with the command that made it) and ``edge.png`` under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if command:
        report = {**report, "command": command}
    path = out_dir / "edge.json"
    path.write_text(json.dumps(report, indent=1))
    if not any(r["status"] == "ok" for r in report["runs"]):
        return [path]
    return [path, plot_edge(report, out_dir / "edge.png")]
