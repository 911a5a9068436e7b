"""`kvflow profile --serve`: the command around kvflow/sim/serve_profile.py."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from kvflow.config import EngineConfig
from kvflow.sim.profile_io import EngineSettings
from kvflow.sim.serve_profile import Load


def _serve_flags(model: str, serve_args: str) -> tuple[tuple[int, int], EngineConfig]:
    """From the serve flags, parsed by `kvflow serve`'s own parser: (prefill, decode) instances
    ((0, 0) when colocated) and the engine config the server will run with."""
    from kvflow.cli import add_engine_args, engine_kwargs
    from kvflow.server.cli import add_serve_args

    parser = argparse.ArgumentParser(prog="--serve-args")
    add_engine_args(parser)
    add_serve_args(parser)
    flags = parser.parse_args(shlex.split(serve_args))
    config = EngineConfig.create(model, dtype=flags.dtype, max_model_len=flags.max_model_len, **engine_kwargs(flags))
    instances = (flags.prefill, flags.decode) if flags.disagg else (0, 0)
    return instances, config


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
    from kvflow.sim.profile_io import describe_latency, load_profile
    from kvflow.sim.serve_profile import fit_profile_to_steps

    profile = load_profile(path)
    log_dir = Path(profile.extra["calibration"]["step_logs"])
    profile, errors, num_steps = fit_profile_to_steps(profile, log_dir)
    profile.extra["fit"] = errors
    profile.save(path)
    print(f"refitted {num_steps} steps from {log_dir}; saved {path}")
    print("\n".join(describe_latency(profile.instance.latency)))
    return 0


def profile_serving(args: argparse.Namespace) -> int:
    from kvflow.bench.limits import measure_limits
    from kvflow.server.cli import _model_path
    from kvflow.sim.analytical import InstanceProfile
    from kvflow.sim.model_shape import ModelShape
    from kvflow.sim.profile_io import Profile, describe_latency, loopback_bandwidth
    from kvflow.sim.profiler import hardware_description
    from kvflow.sim.serve_profile import CALIBRATION, ProfiledServer, fit_server_steps, frontend_delay, run_loads
    from kvflow.sim.simulate_cli import build_deployment
    from kvflow.sim.simulator import Simulator
    from kvflow.sim.workload import from_bench_result

    if args.refit:
        return refit(Path(args.out))
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda _: None)
    model = _model_path(args)
    (num_prefill, num_decode), config = _serve_flags(model, args.serve_args)
    engine = EngineSettings.from_config(config)
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
        loads = _fit_loads(loads, config.model.max_model_len)
        docs = run_loads(server.url, None, model, loads, args.seed)
        blocks = server.gauge("kvflow:kv_cache_blocks")  # over every instance
    finally:
        server.stop()
    series = server.step_series()
    records = [step for steps, _ in series for step in steps]
    latency, errors = fit_server_steps(series)
    shape = ModelShape.from_pretrained(model)
    machine = hardware_description(0)
    instances = max(1, num_prefill + num_decode)
    instance = InstanceProfile(
        model=shape.name, hardware=machine["name"], tp=1, pp=1, num_devices=1,
        weight_bytes=shape.weight_bytes, kv_bytes_per_token=shape.kv_bytes_per_token,
        kv_capacity_tokens=int(blocks / instances) * engine.block_size, cost_per_hour=args.price_per_hour,
        power_w=args.power_w, stage_share=1.0, latency=latency)
    link = loopback_bandwidth()
    profile = Profile(instance, engine, link, {"model_shape": shape.to_dict(), "serve_args": args.serve_args})
    deployment = build_deployment(profile, None, 1, num_prefill, num_decode)
    frontend = frontend_delay(docs, lambda doc: Simulator(deployment).run(from_bench_result(doc)).results)
    limits = measure_limits(repeats=3)
    profile.extra.update({
        "frontend_s": frontend,
        "hardware": {**machine, "bf16_gflops": limits.gflops("bfloat16"),
                     "mem_bw_gbs": limits.mem_bw_gbs},
        "fit": errors,
        "calibration": {"loads": [load.__dict__ for load in loads], "steps": len(records),
                        "step_logs": str(log_dir)},
    })
    path = profile.save(args.out)
    print(f"{len(records)} steps fitted")
    print("\n".join(describe_latency(latency)))
    for name, errs in errors.items():
        print(f"{name} error: " + ", ".join(f"{kind} {100 * e:.1f} %" for kind, e in errs.items()))
    print(f"frontend {frontend * 1e3:.2f} ms; KV capacity {instance.kv_capacity_tokens} tokens per instance; "
          f"saved {path}")
    return 0
