"""`kvflow profile` and `kvflow simulate`: measure this machine's engine, then replay workloads on it.

    kvflow profile --cpu-cores 0,1 --out profiles/tiny-2core.json       # the colocated instance
    kvflow profile --cpu-cores 0 --out profiles/tiny-1core.json         # one 1P1D instance
    kvflow simulate --profile profiles/tiny-2core.json --dataset random --request-rate 8
    kvflow simulate --profile profiles/tiny-1core.json --prefill 1 --decode 1 --replay RUN.json ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_profile(args: argparse.Namespace) -> int:
    if args.serve:
        from kvflow.sim.serve_cli import profile_serving

        return profile_serving(args)
    import torch

    from kvflow.bench.limits import measure_limits
    from kvflow.cli import engine_kwargs
    from kvflow.config import EngineConfig
    from kvflow.server.cli import _model_path
    from kvflow.sim.analytical import InstanceProfile
    from kvflow.sim.hardware import Hardware
    from kvflow.sim.model_shape import ModelShape
    from kvflow.sim.profile_io import EngineSettings, Profile, describe_latency, loopback_bandwidth
    from kvflow.sim.profiler import ProfileGrid, hardware_description, profile_engine

    cores = [int(c) for c in args.cpu_cores.split(",")] if args.cpu_cores else sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    model = _model_path(args)
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


def configure_profile(profile: argparse.ArgumentParser) -> None:
    from kvflow.cli import add_engine_args

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
