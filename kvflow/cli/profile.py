"""`kvflow profile`: measure this machine's engine and fit a latency model (for `kvflow simulate`).

    kvflow profile --cpu-cores 0,1 --out profiles/tiny-2core.json       # the colocated instance
    kvflow profile --cpu-cores 0 --out profiles/tiny-1core.json         # one 1P1D instance
    kvflow profile --serve --serve-args "--disagg --prefill 1 --decode 1" --out P.json   # a live server's steps

With --serve it fits the model to a running `kvflow serve`'s own steps (kvflow/sim/serve_profile.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvflow.cli.engine_args import add_engine_args, engine_kwargs, model_path

if TYPE_CHECKING:
    from kvflow.config import EngineConfig
    from kvflow.sim.serve_profile import Load


def _cmd_profile(args: argparse.Namespace) -> int:
    if args.serve:
        return _profile_serving(args)
    import torch

    from kvflow.bench.limits import measure_limits
    from kvflow.config import EngineConfig
    from kvflow.sim.analytical import InstanceProfile
    from kvflow.sim.hardware import Hardware
    from kvflow.sim.model_shape import ModelShape
    from kvflow.sim.profile_io import EngineSettings, Profile, describe_latency, loopback_bandwidth
    from kvflow.sim.profiler import ProfileGrid, hardware_description, profile_engine

    cores = [int(c) for c in args.cpu_cores.split(",")] if args.cpu_cores else sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    model = model_path(args)
    config = EngineConfig.create(model, dtype=args.dtype, max_model_len=args.max_model_len, device=args.device,
                                 seed=args.seed, **engine_kwargs(args))
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    result = profile_engine(config, ProfileGrid.quick() if args.quick else ProfileGrid(), args.seed, say)
    limits = measure_limits(repeats=3)
    link = loopback_bandwidth()
    described = hardware_description(len(cores))
    name = f"{described['name']} x{len(cores)}"
    hardware = Hardware.from_measurement(name, limits.gflops("bfloat16") * 1e9, limits.mem_bw_gbs * 1e9,
                                         _memory_bytes(), args.power_w, args.price_per_hour, len(cores))
    dtype = str(config.model.dtype).removeprefix("torch.")
    shape = ModelShape.from_pretrained(model, dtype=dtype)
    instance = InstanceProfile(
        model=shape.name, hardware=name, tp=1, pp=1, num_devices=1, weight_bytes=shape.weight_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token, kv_capacity_tokens=result.num_blocks * config.cache.block_size,
        cost_per_hour=args.price_per_hour, power_w=args.power_w, stage_share=1.0, latency=result.latency)
    profile = Profile(
        instance, EngineSettings.from_config(config), link,
        {"hardware": {**hardware.to_dict(), **described, "cpu_cores": cores}, "model_shape": shape.to_dict(),
         "fit": {"prefill_mape": result.latency.prefill.mape, "decode_mape": result.latency.decode.mape,
                 "mixed_mape": result.mixed_mape},
         "samples": [s.__dict__ for s in result.samples]})
    path = profile.save(args.out)
    print("\n".join(describe_latency(result.latency)))
    if result.mixed_mape is not None:
        print(f"mixed iterations (not fitted): error {100 * result.mixed_mape:.1f} %")
    print(f"KV capacity {instance.kv_capacity_tokens} tokens; loopback link {link / 1e9:.2f} GB/s; saved {path}")
    return 0


def _memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def configure(profile: argparse.ArgumentParser) -> None:
    add_engine_args(profile)
    profile.add_argument("--cpu-cores", default=None, help="pin to these cores, e.g. 0 or 0,1 (default: all)")
    profile.add_argument("--quick", action="store_true", help="a small grid (seconds, for a first look)")
    profile.add_argument("--out", type=Path, default=Path("profiles/profile.json"))
    profile.add_argument("--power-w", type=float, default=65.0,
                         help="power drawn while serving (W), for the simulator's power figures")
    profile.add_argument("--price-per-hour", type=float, default=0.10, help="$ per hour of this machine")
    profile.add_argument("--quiet", action="store_true")
    profile.add_argument("--serve", action="store_true",
                         help="fit to a running `kvflow serve`'s own steps under calibration loads (includes the "
                              "API process's share of the cores and the output path)")
    profile.add_argument("--refit", action="store_true",
                         help="with --serve: fit the profile at --out again from its saved step logs (no server)")
    profile.add_argument("--serve-args", default="", help="with --serve: extra `kvflow serve` flags, e.g. "
                         "'--disagg --prefill 1 --decode 1 --pin-cores'")
    profile.set_defaults(func=_cmd_profile)


def _serve_flags(model: str, serve_args: str) -> tuple[tuple[int, int], EngineConfig]:
    """From the serve flags, parsed by `kvflow serve`'s own parser: (prefill, decode) instances
    ((0, 0) when colocated) and the engine config the server will run with."""
    from kvflow.cli.serve import add_serve_args
    from kvflow.config import EngineConfig

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


def _refit(path: Path) -> int:
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


def _profile_serving(args: argparse.Namespace) -> int:
    from kvflow.bench.limits import measure_limits
    from kvflow.sim.analytical import InstanceProfile
    from kvflow.sim.model_shape import ModelShape
    from kvflow.sim.profile_io import EngineSettings, Profile, describe_latency, loopback_bandwidth
    from kvflow.sim.profiler import hardware_description
    from kvflow.sim.runs import build_deployment
    from kvflow.sim.serve_profile import CALIBRATION, ProfiledServer, fit_server_steps, frontend_delay, run_loads
    from kvflow.sim.simulator import Simulator
    from kvflow.sim.workload import from_bench_result

    if args.refit:
        return _refit(Path(args.out))
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda _: None)
    model = model_path(args)
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
