"""``kvflow bench serve`` and ``kvflow bench serve-plot``: argparse wiring only.

Heavy imports (aiohttp, transformers, matplotlib) happen when a command runs, not when the
``kvflow`` parser is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kvflow.bench.serve.config import DEFAULT_NUM_PROMPTS, ServeBenchConfig
from kvflow.bench.serve.datasets import DATASETS


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    """The run's settings from parsed ``serve`` arguments (ValueError on bad ones)."""
    from kvflow.bench.serve.metrics import parse_goodput, parse_percentiles

    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra-body is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")  # noqa: TRY004 (a user input error)
    cfg = ServeBenchConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, tokenizer=args.tokenizer,
        api_key=args.api_key, dataset=args.dataset, num_prompts=args.num_prompts,
        request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, shared_prefix_len=args.shared_prefix_len,
        num_prefix_groups=args.num_prefix_groups, num_sessions=args.num_sessions, num_turns=args.num_turns,
        first_turn_len=args.first_turn_len, turn_input_len=args.turn_input_len, think_time=args.think_time,
        trace_file=args.trace_file,
        trace_time_scale=args.trace_time_scale, max_input_len=args.max_input_len,
        max_output_len=args.max_output_len, goodput_ms=parse_goodput(args.goodput or []),
        percentiles=parse_percentiles(args.percentiles), ignore_eos=args.ignore_eos,
        temperature=None if args.temperature is not None and args.temperature < 0 else args.temperature,
        extra_body=extra, seed=args.seed, timeout_s=args.timeout, probe=not args.skip_probe,
        label=args.label, result_dir=None if args.no_save else args.result_dir,
        plots=not args.no_plots, progress=not args.disable_tqdm,
    )
    cfg.validate()
    return cfg


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvflow.bench.serve.report import format_table, result_stem, save_result
    from kvflow.bench.serve.runner import run

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"kvflow: error: {e}") from None
    try:
        doc = run(cfg)
    except (RuntimeError, ValueError, OSError) as e:
        raise SystemExit(f"kvflow: error: {e}") from None
    print(format_table(doc))
    if cfg.result_dir:
        path = save_result(doc, cfg.result_dir, result_stem(doc))
        print(f"result: {path}", file=sys.stderr)
        if cfg.plots:
            from kvflow.bench.serve.plots import plot_run

            for png in plot_run(doc, cfg.result_dir, path.stem):
                print(f"plot: {png}", file=sys.stderr)
    return 0 if doc["summary"]["completed"] else 1


def _cmd_serve_plot(args: argparse.Namespace) -> int:
    from kvflow.bench.serve.plots import plot_compare
    from kvflow.bench.serve.report import load_result

    try:
        docs = [load_result(path) for path in args.results]
    except (OSError, ValueError) as e:
        raise SystemExit(f"kvflow: error: {e}") from None
    out = plot_compare(docs, args.out, title=args.title)
    print(f"plot: {out}", file=sys.stderr)
    return 0


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf, got {text}")
    return value


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``serve-plot`` to the ``kvflow bench`` sub-commands."""
    sp = sub.add_parser(
        "serve", help="load-test an OpenAI-compatible server (TTFT/TPOT/ITL/E2E, goodput)",
        description="Stream requests to an OpenAI-compatible server on a Poisson/gamma or trace "
        "schedule and report latency percentiles, throughput and goodput.",
    )
    srv = sp.add_argument_group("server")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000")
    srv.add_argument("--endpoint", default="/v1/completions",
                     help="/v1/completions or /v1/chat/completions")
    srv.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    srv.add_argument("--tokenizer", help="tokenizer dir for exact prompt lengths "
                     "(default: the served model's path when it is local)")
    srv.add_argument("--api-key", default=os.environ.get("KVFLOW_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                     help="bearer token (default: $KVFLOW_API_KEY or $OPENAI_API_KEY)")
    srv.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="send ignore_eos so outputs are exactly the requested length")
    srv.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (<0: do not send)")
    srv.add_argument("--extra-body", help="JSON object merged into every request body")
    srv.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout (s)")
    srv.add_argument("--skip-probe", action="store_true", help="no test request before the run")

    load = sp.add_argument_group("load")
    load.add_argument("--dataset", choices=DATASETS, default="random")
    load.add_argument("--num-prompts", type=int,
                      help=f"requests to send (default {DEFAULT_NUM_PROMPTS}; trace: all rows; "
                      "multi-turn: not used)")
    load.add_argument("--request-rate", type=_rate,
                      help="mean arrivals per second, or inf (default: inf; trace: its own timestamps; "
                      "multi-turn: session starts per second)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more regular")
    load.add_argument("--max-concurrency", type=int,
                      help="most requests in flight at once (multi-turn: most sessions alive at once)")
    load.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")

    ds = sp.add_argument_group("datasets")
    ds.add_argument("--random-input-len", type=int, default=256, help="prompt tokens (shared-prefix: suffix)")
    ds.add_argument("--random-output-len", type=int, default=128,
                    help="output tokens (max_tokens; multi-turn: of every turn)")
    ds.add_argument("--random-range-ratio", type=float, default=0.0,
                    help="lengths uniform in [len*(1-r), len*(1+r)]")
    ds.add_argument("--shared-prefix-len", type=int, default=512, help="tokens of each group's prefix")
    ds.add_argument("--num-prefix-groups", type=int, default=4, help="distinct shared prefixes")
    ds.add_argument("--trace-file", help="Azure-format CSV: TIMESTAMP,ContextTokens,GeneratedTokens")
    ds.add_argument("--trace-time-scale", type=float, default=1.0,
                    help="multiply trace inter-arrival times (0.5 = twice the rate)")
    ds.add_argument("--max-input-len", type=int, help="clip trace prompt lengths")
    ds.add_argument("--max-output-len", type=int, help="clip trace output lengths")
    ds.add_argument("--num-sessions", type=int, default=48, help="multi-turn: chat sessions")
    ds.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per session")
    ds.add_argument("--first-turn-len", type=int, default=1536,
                    help="multi-turn: prompt tokens of a session's first turn (system prompt + document)")
    ds.add_argument("--turn-input-len", type=int, default=128,
                    help="multi-turn: new user tokens of each later turn (after the resent history)")
    ds.add_argument("--think-time", type=float, default=0.0,
                    help="multi-turn: mean seconds a user takes between an answer and the next turn "
                         "(exponential, seeded; default 0: at once)")

    rep = sp.add_argument_group("report")
    rep.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                     help="SLOs, e.g. ttft:500 tpot:50 (also e2e:MS); goodput counts requests meeting all")
    rep.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles")
    rep.add_argument("--result-dir", default="bench_results/serve", help="where JSON and PNGs go")
    rep.add_argument("--label", help="name of this run in files and plots (e.g. kvflow, vllm)")
    rep.add_argument("--no-save", action="store_true", help="print only: no JSON, no plots")
    rep.add_argument("--no-plots", action="store_true", help="JSON but no PNGs")
    rep.add_argument("--disable-tqdm", action="store_true")
    sp.set_defaults(func=_cmd_serve)

    pp = sub.add_parser("serve-plot", help="compare `bench serve` result JSONs in one figure")
    pp.add_argument("results", nargs="+", help="result JSON files (several labels and rates)")
    pp.add_argument("--out", required=True, help="PNG path")
    pp.add_argument("--title")
    pp.set_defaults(func=_cmd_serve_plot)
