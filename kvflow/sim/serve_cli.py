"""`kvflow profile --serve`: the command around kvflow/sim/serve_profile.py."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import httpx

from kvflow.sim.profile_io import EngineSettings
from kvflow.sim.serve_profile import Load


def _serve_flags(serve_args: str) -> tuple[tuple[int, int], EngineSettings]:
    """From the serve flags: (prefill, decode) instances ((0, 0) when colocated) and the scheduler
    settings the simulator must mirror."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--disagg", action="store_true")
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    default = EngineSettings()
    parser.add_argument("--block-size", type=int, default=default.block_size)
    parser.add_argument("--max-num-seqs", type=int, default=default.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=default.max_num_batched_tokens)
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                        default=default.chunked_prefill)
    known, _ = parser.parse_known_args(shlex.split(serve_args))
    engine = EngineSettings(known.block_size, known.max_num_seqs, known.max_num_batched_tokens,
                            known.enable_chunked_prefill)
    return ((known.prefill, known.decode) if known.disagg else (0, 0)), engine


def _fit_loads(loads: tuple[Load, ...], max_model_len: int) -> tuple[Load, ...]:
    """Scale the calibration lengths down so the longest request fits the server's context."""
    out = []
    for load in loads:
        longest = (load.input_len + load.output_len) * (1 + load.range_ratio) + 2
        scale = min(1.0, max_model_len / longest)
        out.append(dataclasses.replace(load, input_len=max(4, int(load.input_len * scale)),
                                       output_len=max(2, int(load.output_len * scale))))
    return tuple(out)


def refit(path: Path) -> int:
    """Fit a saved `--serve` profile again from its step logs (no server): for a newer model form."""
    import json

    from kvflow.sim.profile_io import load_profile
    from kvflow.sim.serve_profile import fit_server_steps, step_periods

    profile = load_profile(path)
    log_dir = Path(profile.extra["calibration"]["step_logs"])
    records = []
    for log in sorted(log_dir.glob("steps*")):
        records += step_periods([json.loads(line) for line in log.read_text().splitlines()])
    latency, errors = fit_server_steps(records)
    profile.instance = dataclasses.replace(profile.instance, latency=latency)
    profile.extra["fit"] = errors
    profile.save(path)
    print(f"refitted {len(records)} steps from {log_dir}: noise {latency.noise_sigma:.3f}; saved {path}")
    return 0


def profile_serving(args: argparse.Namespace) -> int:
    from kvflow.bench.limits import measure_limits
    from kvflow.server.cli import _model_path
    from kvflow.sim.analytical import InstanceProfile
    from kvflow.sim.model_shape import ModelShape
    from kvflow.sim.profile_io import Profile, loopback_bandwidth
    from kvflow.sim.profiler import hardware_description
    from kvflow.sim.serve_profile import CALIBRATION, ProfiledServer, fit_server_steps, frontend_delay, run_loads
    from kvflow.sim.simulate_cli import build_deployment
    from kvflow.sim.simulator import Simulator
    from kvflow.sim.workload import from_bench_result

    if args.refit:
        return refit(Path(args.out))
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda _: None)
    model = _model_path(args)
    (num_prefill, num_decode), engine = _serve_flags(args.serve_args)
    log_dir = Path(args.out).with_suffix("")
    log_dir = log_dir.parent / (log_dir.name + "-steps")
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("steps*"):
        old.unlink()
    server = ProfiledServer(model, args.serve_args, log_dir)
    try:
        server.wait_ready()
        loads = CALIBRATION if not args.quick else tuple(
            dataclasses.replace(load, num_prompts=max(6, load.num_prompts // 6)) for load in CALIBRATION)
        say(f"server up at {server.url}; running {len(loads)} calibration loads")
        max_len = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]
        loads = _fit_loads(loads, int(max_len))
        docs = run_loads(server.url, None, model, loads, args.seed)
        blocks = server.gauge("kvflow:kv_cache_blocks")
        health = httpx.get(f"{server.url}/health", timeout=10)
        count = len(health.json()["instances"]) if health.headers.get("content-type", "").startswith(
            "application/json") else 1
    finally:
        server.stop()
    records = server.step_records()
    latency, errors = fit_server_steps(records)
    shape = ModelShape.from_pretrained(model)
    instance = InstanceProfile(
        model=shape.name, hardware=hardware_description(0)["name"], tp=1, pp=1, num_devices=1,
        weight_bytes=shape.weight_bytes, kv_bytes_per_token=shape.kv_bytes_per_token,
        kv_capacity_tokens=int(blocks / max(1, count)) * engine.block_size, cost_per_hour=args.price_per_hour,
        power_w=args.power_w, stage_share=1.0, latency=latency)
    link = loopback_bandwidth()
    profile = Profile(instance, engine, link, {"model_shape": shape.to_dict(), "serve_args": args.serve_args})
    deployment = build_deployment(profile, None, 1, num_prefill, num_decode)
    frontend = frontend_delay(docs, lambda doc: Simulator(deployment).run(from_bench_result(doc)).results)
    limits = measure_limits(repeats=3)
    profile.extra.update({
        "frontend_s": frontend,
        "hardware": {**hardware_description(0), "bf16_gflops": limits.gflops("bfloat16"),
                     "mem_bw_gbs": limits.mem_bw_gbs},
        "fit": errors,
        "calibration": {"loads": [load.__dict__ for load in loads], "steps": len(records),
                        "step_logs": str(log_dir)},
    })
    path = profile.save(args.out)
    p, d = latency.prefill, latency.decode
    print(f"{len(records)} steps fitted; prefill: {p.coef[0] * 1e3:.3f} ms + {p.coef[1] * 1e6:.3f} us/token + "
          f"{p.coef[2] * 1e9:.4f} ns/token^2 (error {100 * p.mape:.1f} % over {p.num_samples} steps)")
    print(f"decode: {d.coef[0] * 1e3:.3f} ms + {d.coef[1] * 1e9:.3f} ns/context token + {d.coef[2] * 1e6:.1f} us/seq "
          f"(error {100 * d.mape:.1f} % over {d.num_samples} steps)")
    for name, errs in errors.items():
        print(f"{name} error: " + ", ".join(f"{kind} {100 * e:.1f} %" for kind, e in errs.items()))
    print(f"frontend {frontend * 1e3:.2f} ms; KV capacity {instance.kv_capacity_tokens} tokens per instance; "
          f"saved {path}")
    return 0
