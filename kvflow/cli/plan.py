"""`kvflow plan`: choose a deployment for a model, workload and SLOs on a GPU cluster (or this CPU).

    kvflow plan --model OPT-66B --hardware A100-80GB-SXM --nodes 2 --gpus-per-node 8 \\
        --random-input-len 1024 --random-output-len 128 --slo-ttft 400 --slo-tpot 100 --out plans/opt66b

Writes plan.json (every option simulated, with its attainment curve), deployment.json (the
`kvflow serve --deployment` file of the chosen disaggregated plan), and two figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvflow.sim.goodput import Slo
from kvflow.sim.hardware import CATALOGUE, get_hardware, load_catalogue
from kvflow.sim.instance import SCHEDULING_POLICIES
from kvflow.sim.model_shape import ModelShape
from kvflow.sim.planner import ALGORITHMS, OBJECTIVES, PlanContext, deployment_file, plan
from kvflow.sim.profile_io import EngineSettings
from kvflow.sim.workload import add_workload_args, requests_from_args


def _shape(name: str) -> ModelShape:
    return ModelShape.from_pretrained(name) if Path(name).is_dir() else ModelShape.known(name)


def _cmd_plan(args: argparse.Namespace) -> int:
    catalogue = load_catalogue(args.catalogue) if args.catalogue else CATALOGUE
    prefill_hw = get_hardware(args.hardware, catalogue)
    decode_hw = get_hardware(args.decode_hardware or args.hardware, catalogue)
    def workload(rate: float) -> list:
        return requests_from_args(args, rate, args.num_prompts, trace=bool(args.trace_file))
    engine = EngineSettings(16, args.max_num_seqs, args.max_num_batched_tokens, args.chunked_prefill,
                            args.colocated_scheduler)
    ctx = PlanContext(_shape(args.model), Slo(args.slo_ttft / 1e3, args.slo_tpot / 1e3, args.attainment), workload,
                      prefill_hw, decode_hw, args.gpus_per_node, engine, max_len=args.max_model_len)
    algorithms = tuple(a.strip() for a in args.algorithms.split(","))
    unknown = set(algorithms) - set(ALGORITHMS)
    if unknown:
        raise ValueError(f"unknown algorithms {sorted(unknown)}; choose from {', '.join(ALGORITHMS)}")
    chosen, options = plan(ctx, args.nodes, algorithms, args.objective, args.phase_candidates)
    units = max(1, (args.nodes * args.gpus_per_node) // chosen.devices)
    ranked = sorted(options, key=lambda o: -o.score(args.objective))
    print("| option | devices | goodput (req/s) | per device | per $/h | per kW |")
    print("|---|---|---|---|---|---|")
    for o in ranked[:args.show]:
        mark = " **chosen**" if o is chosen else ""
        print(f"| {o.name}{mark} | {o.devices} | {o.goodput.rate:.2f} | {o.score('throughput'):.3f} | "
              f"{o.score('cost'):.3f} | {o.score('power'):.2f} |")
    print(f"plan: {units} x [{chosen.name}] on {units * chosen.devices} devices: "
          f"{units * chosen.goodput.rate:.2f} req/s at {100 * args.attainment:.0f} % SLO attainment, "
          f"${units * chosen.cost_per_hour:.2f}/h, {units * chosen.power_w / 1e3:.1f} kW")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"model": ctx.shape.name, "slo_ms": ctx.slo.ms, "attainment_target": ctx.slo.target,
               "objective": args.objective, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
               "units": units, "chosen": chosen.to_dict(), "options": [o.to_dict() for o in ranked]}
        (out / "plan.json").write_text(json.dumps(doc, indent=1))
        deployment = deployment_file(chosen, units, args.cpus_per_instance)
        if deployment is not None:
            (out / "deployment.json").write_text(json.dumps(deployment, indent=1))
        from kvflow.sim.plots import plot_plan

        for path in plot_plan(ranked, chosen, args.objective, out, args.show):
            print(f"wrote {path}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a built-in shape (e.g. OPT-66B, Llama-2-70B) or a model directory")
    p.add_argument("--hardware", default="A100-80GB-SXM", help="prefill (and decode) device from the catalogue")
    p.add_argument("--decode-hardware", default=None, help="decode device, for mixed-hardware pools")
    p.add_argument("--catalogue", default=None, help="JSON overriding or adding hardware entries")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--slo-ttft", type=float, required=True, help="ms")
    p.add_argument("--slo-tpot", type=float, required=True, help="ms")
    p.add_argument("--attainment", type=float, default=0.9, help="fraction of requests within both SLOs")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="goodput per device, per $/h or per kW")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    add_workload_args(p, input_len=512, output_len=128, range_ratio=0.5)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequence slots per instance")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per iteration")
    p.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="colocated instances split prompts into chunks batched with decodes (Sarathi); "
                        "--no-chunked-prefill schedules whole prompts, as DistServe's vLLM baseline did")
    p.add_argument("--colocated-scheduler", choices=SCHEDULING_POLICIES, default="mixed",
                   help="mixed: prompts and decodes share iterations (kvflow); prefill-first: prompts run alone "
                        "and decodes wait (vLLM v0, DistServe's baseline)")
    p.add_argument("--num-prompts", type=int, default=300, help="requests simulated per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus-per-instance", type=float, default=8.0,
                   help="CPUs each instance reserves in the deployment file's Ray bundles (tokenisation, scheduling)")
    p.add_argument("--phase-candidates", type=int, default=2,
                   help="Alg. 1: layouts kept per phase (by its own goodput per device) for the joint ratio search")
    p.add_argument("--show", type=int, default=12, help="options in the table and figures")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_plan)
