"""``kvflow bench zoo``: N fine-tuned variants served by one engine (BlockLLM's block zoo) against N
engines, one per variant, as a deployment without a zoo would run them.

The variants are written here from the base model: a copy with its top ``--changed-layers`` decoder
layers perturbed (what `kvflow train --finetune --method top-layers` produces; the values do not matter
for cost). Each configuration runs in processes of its own, started and loaded first, then released
together: ``zoo`` is one process serving every variant, ``separate`` is N processes, one engine each,
each with cores // N torch threads (N processes with all cores each would only oversubscribe them). The
request mix is fixed: ``--requests`` per variant, random prompts of ``--prompt-len`` tokens, greedy
``--max-tokens`` tokens each (EOS ignored), all arriving at once. KV memory is the same in all: 0.25 GiB
per separate engine, N times that for the zoo (the engines' default, 30% of memory each, would not fit
N). Reported per configuration: wall time, output tokens/s, request latency p50 / p95 (arrival to last
token, as BlockLLM reports it), peak RSS summed over its processes, the weight bytes each variant
adds, and the most KV held at once.

``--system-prompt-len S`` starts every prompt with the same S tokens, computed once per served model
before the batch (prefix caching on in every configuration), and adds ``zoo-private-kv``: the zoo with
each variant's KV its own in every layer (``--no-zoo-share-kv``). Against it, the ``zoo`` row shows
what sharing the KV of the layers below each variant's own saves: the system prompt's KV in those layers
is held once for the base and every variant.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

WORKER = "kvflow.bench.zoo_worker"


def write_variant(base: Path, out: Path, changed_layers: int, seed: int, scale: float = 0.02) -> Path:
    """A copy of `base` whose top `changed_layers` decoder layers are perturbed (every other tensor identical)."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    layers = 1 + max(int(name.split(".")[2]) for f in base.glob("*.safetensors") for name in load_file(f)
                     if name.startswith("model.layers."))
    changed = {f"model.layers.{i}." for i in range(layers - changed_layers, layers)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for file in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(file))
    for name, t in tensors.items():
        if any(name.startswith(prefix) for prefix in changed):
            noise = torch.randn(t.shape, generator=gen) * scale * t.float().abs().mean()
            tensors[name] = (t.float() + noise).to(t.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _start(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", WORKER, *args, "--threads", str(threads)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _run_processes(jobs: list[tuple[list[str], int]]) -> tuple[float, list[dict[str, Any]]]:
    """Start every worker, wait until all have loaded, release them together; (wall seconds, their reports)."""
    procs = [_start(args, threads) for args, threads in jobs]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a bench zoo worker failed to start (exit {p.wait()})")
        start = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline()) for p in procs]
        wall = time.perf_counter() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return wall, reports


def run_zoo_bench(model: Path, counts: tuple[int, ...], changed_layers: int, requests: int, prompt_len: int,
                  max_tokens: int, dtype: str, work: Path, cores: int | None = None,
                  kv_gib: float = 0.25, system_prompt_len: int = 0) -> dict[str, Any]:
    cores = cores or os.cpu_count() or 1
    results = []
    for n in counts:
        variants = {f"v{i}": str(write_variant(model, work / f"v{i}", changed_layers, seed=i)) for i in range(n)}
        common = ["--model", str(model), "--dtype", dtype, "--requests", str(requests), "--prompt-len",
                  str(prompt_len), "--max-tokens", str(max_tokens), "--system-prompt-len", str(system_prompt_len)]
        # The same KV memory in all: each separate engine gets kv_gib, the zoo n times that.
        zoo_args = [*common, "--variant", *(f"{k}={v}" for k, v in variants.items()), "--serve", *variants,
                    "--kv-cache-memory", str(n * kv_gib)]
        runs = {"zoo": _run_processes([(zoo_args, cores)])}
        if system_prompt_len:
            runs["zoo-private-kv"] = _run_processes([([*zoo_args, "--no-zoo-share-kv"], cores)])
        separate = [([*common, "--model", path, "--serve", "base", "--kv-cache-memory", str(kv_gib)],
                     max(1, cores // n)) for path in variants.values()]
        runs["separate"] = _run_processes(separate)
        row: dict[str, Any] = {"variants": n}
        for label, (wall, reports) in runs.items():
            latencies = sorted(x for r in reports for x in r["latencies"])
            tokens = sum(r["tokens"] for r in reports)
            row[label] = {"wall_s": wall, "output_tok_s": tokens / wall,
                          "latency_p50_s": statistics.median(latencies),
                          "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                          "peak_rss_mib": sum(r["peak_rss_mib"] for r in reports),
                          "weight_mib": sum(r["weight_mib"] for r in reports), "processes": len(reports),
                          "kv_peak_mib": sum(r["kv_peak_mib"] for r in reports),
                          "kv_layer_groups": reports[0]["kv_layer_groups"]}
        row["zoo"]["variant_unique_mib"] = runs["zoo"][1][0]["variant_unique_mib"]
        row["throughput_ratio"] = row["zoo"]["output_tok_s"] / row["separate"]["output_tok_s"]
        row["rss_ratio"] = row["zoo"]["peak_rss_mib"] / row["separate"]["peak_rss_mib"]
        results.append(row)
        for path in variants.values():
            shutil.rmtree(path, ignore_errors=True)
    return {"model": str(model), "dtype": dtype, "changed_layers": changed_layers, "requests_per_variant": requests,
            "prompt_len": prompt_len, "max_tokens": max_tokens, "system_prompt_len": system_prompt_len,
            "cores": cores, "results": results}


def format_report(report: dict[str, Any]) -> str:
    system = report.get("system_prompt_len", 0)
    lines = [f"kvflow bench zoo: {report['model']} ({report['dtype']}), top {report['changed_layers']} layer(s) "
             f"changed per variant, {report['requests_per_variant']} requests per variant, prompt "
             f"{report['prompt_len']}" + (f" after a {system}-token system prompt" if system else "")
             + f", {report['max_tokens']} output tokens, {report['cores']} cores",
             f"{'N':>3} {'config':14} {'wall s':>7} {'tok/s':>7} {'p50 s':>6} {'p95 s':>6} {'RSS MiB':>8} "
             f"{'weights MiB':>11} {'KV peak MiB':>11} {'groups':>6}"]
    for row in report["results"]:
        for label in ("zoo", "zoo-private-kv", "separate"):
            if label not in row:
                continue
            r = row[label]
            lines.append(f"{row['variants']:>3} {label:14} {r['wall_s']:7.2f} {r['output_tok_s']:7.1f} "
                         f"{r['latency_p50_s']:6.2f} {r['latency_p95_s']:6.2f} {r['peak_rss_mib']:8.0f} "
                         f"{r['weight_mib']:11.1f} {r['kv_peak_mib']:11.1f} {r['kv_layer_groups']:>6}")
        unique = ", ".join(f"{k} {v:.1f}" for k, v in row["zoo"]["variant_unique_mib"].items())
        lines.append(f"    zoo/separate: throughput {row['throughput_ratio']:.2f}x, RSS {row['rss_ratio']:.2f}x; "
                     f"MiB each variant adds: {unique}")
    return "\n".join(lines)
