"""`kvflow simulate`: a workload on a deployment of profiled instances, or a recorded run replayed.

With `--replay RUN.json ...` (results of `kvflow bench serve`) each run's exact request stream is
simulated and the simulated figures are printed next to the measured ones: the validation table.
Results are written in `kvflow bench serve`'s format (`"simulated": true`), so its plots apply.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvflow.bench.serve.metrics import DEFAULT_PERCENTILES, parse_goodput, parse_percentiles, percentile_key
from kvflow.sim.profile_io import Profile, load_profile
from kvflow.sim.runs import build_deployment, deployment_economics, median_summary, result_doc, summarize_measured
from kvflow.sim.serve_profile import fit_profile_to_steps
from kvflow.sim.simulator import Deployment, Simulator
from kvflow.sim.validate import ValidationReport, validation_errors
from kvflow.sim.workload import SimRequest, add_workload_args, from_bench_result, requests_from_args


def _workload(args: argparse.Namespace) -> list[SimRequest]:
    if args.dataset == "trace":
        if not args.trace_file:
            raise ValueError("--dataset trace needs --trace-file")
        return requests_from_args(args, args.request_rate, args.num_prompts, trace=True)
    if args.request_rate is None:
        raise ValueError("--dataset random needs --request-rate")
    return requests_from_args(args, args.request_rate, args.num_prompts or 1000, trace=False)


def _row(name: str, summary: dict[str, Any]) -> str:
    def ms(metric: str, p: float) -> float:
        return summary[metric].get(percentile_key(p), float("nan"))

    attain = summary.get("goodput", {}).get("attainment", {}).get("all")
    goodput = summary.get("goodput", {}).get("request_goodput")
    return (f"| {name} | {ms('ttft_ms', 50):.1f} / {ms('ttft_ms', 90):.1f} | {ms('tpot_ms', 50):.2f} / "
            f"{ms('tpot_ms', 90):.2f} | " + ("-" if attain is None else f"{100 * attain:.1f}") + " | "
            + ("-" if goodput is None else f"{goodput:.2f}") + " |")


def _frontend_s(args: argparse.Namespace, profile: Profile) -> float:
    if args.frontend_ms is not None:
        return args.frontend_ms / 1e3
    return float(profile.extra.get("frontend_s", 0.0))


def _error_row(name: str, measured: dict[str, Any], simulated: dict[str, Any]) -> str:
    e = validation_errors(measured, simulated)

    def pct(key: str) -> str:
        return f"{100 * e[key]:+.0f} %" if key in e else "-"

    points = f"{e['attainment_points']:+.1f}" if "attainment_points" in e else "-"
    return f"| {name} | {pct('ttft_p50')} / {pct('ttft_p90')} | {pct('tpot_p50')} / {pct('tpot_p90')} | {points} | |"


Run = tuple[str, list[SimRequest], dict[str, float], dict[str, Any] | None, Path | None]  # name, requests, SLOs,
# the measured result (None: a synthetic workload) and its path


def _replayed_runs(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    for path in args.replay or []:
        doc = json.loads(Path(path).read_text())
        recorded = doc.get("summary", {}).get("goodput", {}).get("slos_ms", {})
        slos = parse_goodput(args.goodput) if args.goodput else recorded
        runs.append((f"{doc.get('label', Path(path).stem)} @ {doc.get('rate_label', '?')}", from_bench_result(doc),
                     slos, doc, Path(path)))
    return runs


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    base = load_profile(args.profile)
    own_steps = args.fit_steps == "own"  # each replayed run's own step logs, next to its result
    if own_steps and not args.replay:
        raise ValueError("--fit-steps own needs --replay")
    profile = fit_profile_to_steps(base, args.fit_steps)[0] if args.fit_steps and not own_steps else base
    decode = load_profile(args.decode_profile) if args.decode_profile else None

    def deployment_of(prof: Profile) -> Deployment:
        return build_deployment(prof, decode, args.colocated or 0, args.prefill, args.decode, args.kv_transfer_mode,
                                args.link_bandwidth * 1e9 if args.link_bandwidth else None,
                                args.transfer_latency_ms / 1e3, _frontend_s(args, prof))

    deployment = deployment_of(profile)
    percentiles = parse_percentiles(args.percentiles) if args.percentiles else DEFAULT_PERCENTILES
    runs = _replayed_runs(args)
    if not runs:
        runs.append((args.label or "simulated", _workload(args), parse_goodput(args.goodput or []), None, None))
    print("| run | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | SLO attainment (%) | goodput (req/s) |")
    print("|---|---|---|---|---|")
    cost = deployment_economics(profile, decode, args.colocated or 0, args.prefill, args.decode)
    report = ValidationReport()
    fitted: dict[Path, Deployment] = {}  # --fit-steps own: one fit per directory of step logs
    for name, requests, slos, measured, path in runs:
        if own_steps and path is not None:
            if path.parent not in fitted:
                fitted[path.parent] = deployment_of(fit_profile_to_steps(base, path.parent)[0])
            deployment = fitted[path.parent]
        docs = [result_doc(Simulator(deployment, args.seed + k).run(requests), requests, f"sim-{name}", slos,
                           percentiles, args.profile, cost) for k in range(args.repeats)]
        doc = docs[0]
        if args.repeats > 1:  # the jitter makes each simulation one draw: report the median draw
            doc["summary"] = median_summary([d["summary"] for d in docs])
            doc["repeats"] = args.repeats
        if measured is not None:
            measured_summary = summarize_measured(measured, slos, percentiles)
            print(_row(f"{name} measured", measured_summary))
            print(_row(f"{name} simulated", doc["summary"]))
            print(_error_row(f"{name} error", measured_summary, doc["summary"]))
            report.add(name, measured, measured_summary, doc["summary"])
        else:
            print(_row(f"{name} simulated", doc["summary"]))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = "".join(c if c.isalnum() or c in "-._" else "_" for c in name)
            (out / f"sim-{stem}.json").write_text(json.dumps(doc, default=float))
    for line in report.lines():
        print(line)
    money = doc["economics"]
    print(f"deployment: {deployment.num_instances} instances, ${money['cost_per_hour']:.2f}/h, "
          f"{money['power_w']:.0f} W; last run: ${money['dollars_per_1k_requests']:.4f} and "
          f"{money['kwh_per_1k_requests']:.4f} kWh per 1,000 requests")
    return 0


def configure(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--profile", required=True, help="a `kvflow profile` JSON (prefill or colocated instances)")
    sim.add_argument("--decode-profile", default=None, help="decode instances' profile (default: --profile)")
    sim.add_argument("--colocated", type=int, default=None, help="colocated instances (default 1)")
    sim.add_argument("--prefill", type=int, default=0, help="prefill instances (disaggregated)")
    sim.add_argument("--decode", type=int, default=0, help="decode instances (disaggregated)")
    sim.add_argument("--kv-transfer-mode", choices=("layerwise", "whole"), default="layerwise")
    sim.add_argument("--link-bandwidth", type=float, default=None, help="GB/s per prefill instance's link "
                     "(default: the profile's measured loopback)")
    sim.add_argument("--transfer-latency-ms", type=float, default=0.0, help="fixed cost per transfer")
    sim.add_argument("--frontend-ms", type=float, default=None,
                     help="added to every token's delivery (default: the profile's calibrated value, else 0)")
    sim.add_argument("--fit-steps", default=None, metavar="DIR|own",
                     help="fit the latency model to the step logs in DIR (`kvflow serve --step-log DIR/steps`) "
                          "instead of the profile's; 'own': each replayed run to the step logs in its result's "
                          "directory. Simulates with the latencies a recorded run really had, which separates the "
                          "simulator's own error from the machine's drift since profiling")
    sim.add_argument("--replay", nargs="+", default=None, help="`kvflow bench serve` results to replay and compare")
    sim.add_argument("--dataset", choices=("random", "trace"), default="random")
    sim.add_argument("--num-prompts", type=int, default=None)
    sim.add_argument("--request-rate", type=float, default=None)
    add_workload_args(sim, input_len=256, output_len=64, range_ratio=0.0)
    sim.add_argument("--seed", type=int, default=0, help="of the workload and of the iteration jitter")
    sim.add_argument("--repeats", type=int, default=1,
                     help="simulate each run this many times (seeds --seed, --seed+1, ...) and report the "
                          "median of each figure: the jitter makes one simulation one draw")
    sim.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    sim.add_argument("--percentiles", default=None)
    sim.add_argument("--label", default=None)
    sim.add_argument("--out", default=None, help="directory for the simulated runs' JSON")
    sim.set_defaults(func=_cmd_simulate)

