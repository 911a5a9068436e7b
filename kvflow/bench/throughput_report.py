"""Many throughput runs at once: every backend × workload on the same prompts, compared with
each other (speed ratios, output agreement), printed as a table and saved as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kvflow.bench.cpu_idle import wait_for_idle_cpu
from kvflow.bench.limits import format_limits, measure_limits
from kvflow.bench.throughput import WORKLOADS, BackendUnavailable, get_backend, run_throughput


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How far two backends' greedy outputs agree: identical prompts and mean common prefix."""
    prefixes = []
    for x, y in zip(a, b, strict=True):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k / max(len(x), 1))
    return {
        "identical_fraction": sum(x == y for x, y in zip(a, b)) / len(a),
        "mean_common_prefix_fraction": sum(prefixes) / len(prefixes),
    }


def compare_runs(runs: list[dict[str, Any]]) -> None:
    """Add, per workload, each run's speed ratio and output agreement vs every other backend."""
    for run in runs:
        others = [
            o for o in runs if o["workload"] == run["workload"] and o["backend"] != run["backend"]
        ]
        run["speedup_vs"] = {o["backend"]: run["output_tok_s"] / o["output_tok_s"] for o in others}
        run["agreement_vs"] = {
            o["backend"]: _agreement(run["token_ids"], o["token_ids"]) for o in others
        }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _saving(run: dict[str, Any]) -> str:
    """The batch's prefix plan: one-level R_saving (multi-level optimum)."""
    plan = run.get("prefix_plan")
    return f"{plan['saving_ratio']:.2f} ({plan['optimal_saving_ratio']:.2f})" if plan else "-"


def format_table(runs: list[dict[str, Any]]) -> str:
    """Plain-text table of runs (no progress bars, fixed columns) for terminals and logs."""
    header = [
        "backend", "workload", "out tok/s", "total tok/s", "wall s", "ms/tok", "decode ms",
        "ttft ms", "RSS MiB loaded/peak", "cpu %", "% of limit", "R_saving (opt)", "KV peak/blocks", "vs",
    ]  # fmt: skip
    rows = [header]
    for r in runs:
        vs = ", ".join(f"{v:.2f}x {k}" for k, v in r.get("speedup_vs", {}).items())
        rows.append(
            [
                r["backend"],
                r["workload"],
                _fmt(r["output_tok_s"], ".1f"),
                _fmt(r["total_tok_s"], ".1f"),
                _fmt(r["wall_s"], ".2f"),
                _fmt(r.get("ms_per_token"), ".2f"),
                _fmt(r.get("decode_ms_per_token"), ".2f"),
                _fmt(r.get("ttft_ms"), ".1f"),
                f"{_fmt(r.get('loaded_rss_mib'), '.0f')}/{_fmt(r['peak_rss_mib'], '.0f')}",
                _fmt(100 * r["cpu_util"], ".0f"),
                _fmt(100 * r["fraction_of_limit"], ".1f"),
                _saving(r),
                f"{_fmt(r['kv']['peak_kv_blocks'], 'd')}/{r['kv']['kv_blocks']}" if r.get("kv") else "-",
                vs or "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    """What the numbers depend on besides the engine: versions, CPU, threads."""
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def run_many(
    model_dir: Path | str,
    backends: Sequence[str],
    workloads: Sequence[str],
    output: Path | str | None = None,
    backend_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run every backend × workload on the same prompts, print a table and save JSON.

    Unknown backends fail before anything runs; one that is not installed here is reported and
    skipped (``skipped`` in the report says why), so one missing peer does not cost the others'
    figures. Returns the saved report (``runs`` without their token ids, which only feed the
    agreement). ``backend_kwargs[name]`` become that backend's ``engine_kwargs``; ``kwargs`` go
    to ``run_throughput``.
    """
    for name in backends:
        get_backend(name)
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; expected one of {WORKLOADS}")
    limits = kwargs.pop("limits", None)
    if limits is None:
        if kwargs.get("wait_idle_s", 0.0) > 0:
            wait_for_idle_cpu(kwargs["wait_idle_s"])
        limits = measure_limits()
    print(format_limits(limits), flush=True)
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in backends:
        for w in workloads:
            print(f"running {name} {w} ...", flush=True)
            engine_kwargs = (backend_kwargs or {}).get(name)
            try:
                runs.append(
                    run_throughput(model_dir, name, w, limits=limits, engine_kwargs=engine_kwargs, **kwargs)
                )
            except BackendUnavailable as e:
                skipped[name] = str(e)
                print(f"skipping backend {name!r}: {e}", flush=True)
                break
    compare_runs(runs)
    print(format_table(runs))
    contended = [r for r in runs if r["cpu_util"] < 0.8]
    if contended:
        print(
            "warning: some runs got under 80% of their threads' CPU time (cpu % column); "
            "other processes were probably competing for the cores, so those figures are low "
            "(try --wait-idle, or --threads 1 on a shared machine)"
        )
    for r in runs:
        del r["token_ids"]
    model_dir = Path(model_dir)
    meta_path = model_dir / "kvflow_model.json"
    report = {
        "kind": "throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": str(model_dir),
        "model_made_by": json.loads(meta_path.read_text()) if meta_path.is_file() else None,
        "limits": limits.to_dict(),
        "environment": _environment(),
        "runs": runs,
        "skipped": skipped,
    }
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = Path("bench_results") / f"throughput-{model_dir.name}-{stamp}.json"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {output}")
    report["path"] = str(output)
    return report
