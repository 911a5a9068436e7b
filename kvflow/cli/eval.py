"""`kvflow eval --model DIR [--tasks ...] [grid flags] [engine flags] [--out DIR]`.

Engine flags are the ones every engine command takes (`kvflow.cli.engine_args.add_engine_args`), so the
same evaluation can be repeated under different engine settings and the results compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kvflow.cli.engine_args import add_engine_args, make_llm, model_path

if TYPE_CHECKING:
    from kvflow.eval.kv_methods import KVMethod


def _list_of(kind: Callable, name: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} must not be empty")
        return values

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    from kvflow.eval.runner import TASKS, EvalConfig

    d = EvalConfig()
    parser.description = (
        "Held-out perplexity (with a unigram baseline and bits per byte), passkey retrieval over context length x "
        "needle depth and multi-key recall over pairs x length, all through the engine configured by the engine "
        "flags. --seed also fixes the evaluation samples. Writes results.json, passkey.json/.png and "
        "multikey.json/.png to --out.")
    add_engine_args(parser)  # --seed also seeds the evaluation's samples
    group = parser.add_argument_group("evaluation")
    group.add_argument("--tasks", type=_list_of(str, "--tasks"), default=d.tasks,
                       help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    group.add_argument("--lengths", type=_list_of(int, "--lengths"), default=d.lengths,
                       help="context lengths in tokens (default: %(default)s)")
    group.add_argument("--depths", type=_list_of(float, "--depths"), default=d.depths,
                       help="passkey needle depths in [0, 1] (default: %(default)s)")
    group.add_argument("--trials", type=int, default=d.trials,
                       help="passkey samples / multikey contexts per cell (default: %(default)s)")
    group.add_argument("--pairs", type=_list_of(int, "--pairs"), default=d.pairs,
                       help="multikey numbers of key-value pairs (default: %(default)s)")
    group.add_argument("--multikey-lengths", type=_list_of(int, "--multikey-lengths"), default=None,
                       help="multikey context lengths (default: --lengths)")
    group.add_argument("--queries", type=int, default=d.queries, help="multikey queries per context")
    group.add_argument("--ppl-context", type=int, default=None,
                       help="tokens per perplexity window, BOS included (default: min(1024, max_model_len - 1))")
    group.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens, help="held-out tokens scored")
    group.add_argument("--draft", type=Path, default=None,
                       help="a draft model directory: report its greedy next-token agreement with --model")
    group.add_argument("--no-unigram", action="store_true", help="skip the unigram baseline")
    group.add_argument("--heldout-percent", type=int, default=None,
                       help="held-out split (default: the model's train_report.json, else 3)")
    group.add_argument("--max-source-files", type=int, default=None,
                       help="stdlib files in the corpus (default: the model's train_report.json, else all; 0 = all)")
    group.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "kvflow" / "eval",
                       help="cache for the train split's unigram counts (default: %(default)s)")
    group.add_argument("--no-cache", action="store_true")
    group.add_argument("--out", type=Path, default=None,
                       help="output folder (default: eval_results/<model directory name>)")
    group.add_argument("--json", action="store_true", help="print the results (without samples) as JSON")
    group.add_argument("--kv-budget-fraction", type=float, default=None, metavar="F",
                       help="with --kv-policy: each request's kv_budget = max(smallest valid budget, "
                            "round(F x its prompt tokens)), 0 < F <= 1, so every context length keeps the same share")
    group.add_argument("--compare-kv", type=_list_of(str, "--compare-kv"), default=None, metavar="METHODS",
                       help="evaluate under each of these KV methods (comma-separated): a --kv-cache-dtype value "
                            "(int8), a policy at a budget fraction (snapkv@0.25, quest@0.125, h2o@0.5, "
                            "streaming@0.25) or both (int8+snapkv@0.25); kivi4 and kivi2 page in blocks of 32 "
                            "tokens where --block-size is not a multiple of 32; writes a table and a figure of "
                            "accuracy against KV bytes (kv_compare.json/.png in --out; each method's results in a "
                            "folder of --out named after it, '+' and '@' as '-')")
    group.add_argument("--compare-weights", type=_list_of(str, "--compare-weights"), default=None, metavar="METHODS",
                       help="evaluate quantised copies of --model (comma-separated): dense, q8_0, q4_0, q4_k, int8, "
                            "bipolarN (N = 2..8) or a range bipolar2..8, each optionally +awq (calibrated on the "
                            "train split); writes a table and a figure of accuracy against bits per weight "
                            "(weight_compare.json/.png in --out; quantised models in --out/models/)")
    group.add_argument("--rerun", action="store_true",
                       help="with --compare-kv or --compare-weights: evaluate every method again instead of "
                            "reusing results saved in its folder with the same settings")
    group.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    group.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvflow.eval.report import format_report, save_results
    from kvflow.eval.runner import EvalConfig, run_eval

    if args.kv_budget_fraction is not None and not 0 < args.kv_budget_fraction <= 1:
        raise SystemExit(f"kvflow: error: --kv-budget-fraction must be in (0, 1], got {args.kv_budget_fraction}")
    config = EvalConfig(
        tasks=args.tasks, lengths=args.lengths, depths=args.depths, trials=args.trials, pairs=args.pairs,
        multikey_lengths=args.multikey_lengths, queries=args.queries, ppl_context=args.ppl_context,
        ppl_tokens=args.ppl_tokens, unigram=not args.no_unigram, heldout_percent=args.heldout_percent,
        max_source_files=args.max_source_files, seed=args.seed, kv_budget_fraction=args.kv_budget_fraction,
        cache_dir=None if args.no_cache else str(args.cache_dir), progress=not args.no_progress,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.compare_kv and args.compare_weights:
        raise SystemExit("kvflow: error: --compare-kv and --compare-weights are separate evaluations; "
                         "run them one at a time")
    if args.compare_kv:
        return _compare_kv(args, config)
    if args.compare_weights:
        return _compare_weights(args, config)
    if args.kv_budget_fraction is not None:
        args = _with_policy_budget(args)
    args = _with_kivi_block_size(args)
    llm = make_llm(args)
    draft_llm = None
    if args.draft is not None:
        draft_llm = make_llm(argparse.Namespace(**{**vars(args), "model": str(args.draft)}))
    result = run_eval(llm, config, log=lambda msg: print(msg, file=sys.stderr, flush=True), draft_llm=draft_llm)
    out = args.out or Path("eval_results") / (Path(result.model).name or "model")
    paths = save_results(result, out)
    if args.json:
        print(json.dumps(result.to_dict(samples=False), indent=2, default=str))
    else:
        print(format_report(result))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _with_kivi_block_size(args: argparse.Namespace) -> argparse.Namespace:
    """KIVI needs blocks of a multiple of 32 tokens: without --block-size, a kivi4/kivi2 evaluation
    pages in blocks of 32 (and says so); a --block-size given is left to the engine to check."""
    from kvflow.config import KIVI_CACHE_DTYPES
    from kvflow.eval.kv_methods import KIVI_BLOCK_SIZE

    if args.kv_cache_dtype not in KIVI_CACHE_DTYPES or args.block_size is not None:
        return args
    print(f"note: --kv-cache-dtype {args.kv_cache_dtype} pages in blocks of {KIVI_BLOCK_SIZE} tokens "
          f"(--block-size {KIVI_BLOCK_SIZE})", file=sys.stderr)
    return argparse.Namespace(**{**vars(args), "block_size": KIVI_BLOCK_SIZE})


def _policy_knobs(args: argparse.Namespace) -> dict:
    """The sinks and window the engine will use: the flags, else CacheConfig's defaults."""
    from kvflow.config import CacheConfig

    default = CacheConfig()
    sinks = default.kv_sink_tokens if args.kv_sink_tokens is None else args.kv_sink_tokens
    return {"kv_sink_tokens": sinks, "kv_window": args.kv_window}


def _with_policy_budget(args: argparse.Namespace) -> argparse.Namespace:
    """--kv-budget-fraction needs the engine's --kv-policy; the engine's own --kv-budget (only the default of
    requests without one; every evaluation request brings its own) becomes the smallest valid one if not given."""
    from kvflow.eval.kv_budget import min_kv_budget

    if args.kv_policy in (None, "none"):
        raise SystemExit("kvflow: error: --kv-budget-fraction sets each request's budget for the engine's KV policy; "
                         "add --kv-policy streaming|h2o|snapkv|quest")
    if args.kv_budget is not None:
        return args
    knobs = _policy_knobs(args)
    try:
        floor = min_kv_budget(args.kv_policy, knobs["kv_sink_tokens"], knobs["kv_window"])
    except ValueError as exc:
        raise SystemExit(f"kvflow: error: {exc}") from None
    return argparse.Namespace(**{**vars(args), "kv_budget": floor})


def _compare_kv(args: argparse.Namespace, config) -> int:
    from kvflow.config import CacheConfig
    from kvflow.eval.kv_compare import compare_kv_methods, format_comparison, save_comparison
    from kvflow.eval.kv_methods import parse_methods

    try:
        methods = parse_methods(args.compare_kv)
    except ValueError as exc:
        raise SystemExit(f"kvflow: error: --compare-kv: {exc}") from None
    if args.draft is not None:
        raise SystemExit("kvflow: error: --compare-kv and --draft are separate evaluations; run them one at a time")
    clashing = [flag for flag, value in (("--kv-cache-dtype", args.kv_cache_dtype), ("--kv-budget", args.kv_budget),
                                         ("--kv-budget-fraction", args.kv_budget_fraction))
                if value is not None] + (["--kv-policy"] if args.kv_policy not in (None, "none") else [])
    if clashing:
        raise SystemExit(f"kvflow: error: --compare-kv sets each method's format, policy and budget "
                         f"(e.g. int8+snapkv@0.25); drop {', '.join(clashing)}")
    model = model_path(args)
    out = args.out or Path("eval_results") / f"{Path(model).name or 'model'}-kv"
    knobs = _policy_knobs(args)

    def namespace_for(method: KVMethod) -> argparse.Namespace:
        engine = method.engine_args(knobs["kv_sink_tokens"], knobs["kv_window"], args.block_size)
        return argparse.Namespace(**{**vars(args), **engine})

    _check_engines(methods, namespace_for)  # every method's engine settings, before the first (long) run
    for method in methods:
        if method.block_size(args.block_size) != args.block_size:
            print(f"note: {method.name} pages in blocks of {method.block_size(args.block_size)} tokens (KIVI "
                  f"quantises keys in groups of 32 tokens; the other methods: "
                  f"{args.block_size or CacheConfig().block_size})", file=sys.stderr)
    rows = compare_kv_methods(lambda m: make_llm(namespace_for(m)), model, args.dtype, methods, config, out,
                              reuse=not args.rerun, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                              policy_knobs=knobs, block_size=args.block_size or CacheConfig().block_size)
    print(format_comparison(rows, baseline=methods[0].name))
    json_path, png_path = save_comparison(rows, out, f"{Path(model).name}: accuracy against KV bytes per token "
                                                     f"(model dtype {args.dtype})")
    print(f"wrote {json_path}, {png_path}")
    return 0


def _compare_weights(args: argparse.Namespace, config) -> int:
    from kvflow.eval.data import calibration_tokens, resolve_split
    from kvflow.eval.weight_compare import (
        compare_weight_methods,
        format_weight_comparison,
        parse_weight_methods,
        save_weight_comparison,
    )

    try:
        methods = parse_weight_methods(args.compare_weights)
    except ValueError as exc:
        raise SystemExit(f"kvflow: error: --compare-weights: {exc}") from None
    if args.draft is not None or getattr(args, "quantization", None):
        raise SystemExit("kvflow: error: --compare-weights quantises the model itself; drop --draft / --quantization")
    model = model_path(args)
    out = args.out or Path("eval_results") / f"{Path(model).name or 'model'}-weights"

    def calibration():
        import torch

        from kvflow.model.loader import load_tokenizer

        ids = calibration_tokens(load_tokenizer(model), resolve_split(model, args.heldout_percent,
                                                                      args.max_source_files), 64, 512, args.seed)
        return torch.from_numpy(ids)

    rows = compare_weight_methods(lambda d, overrides: make_llm(argparse.Namespace(**{**vars(args), "model": d,
                                                                                      **overrides})), model,
                                  methods, config, out, calibration, reuse=not args.rerun,
                                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_weight_comparison(rows))
    json_path, png_path = save_weight_comparison(rows, out, f"{Path(model).name}: accuracy against bits per weight")
    print(f"wrote {json_path}, {png_path}")
    return 0


def _check_engines(methods: list[KVMethod], namespace_for: Callable[[KVMethod], argparse.Namespace]) -> None:
    """Build (not start) each method's engine config, so a setting the engine refuses fails now."""
    from kvflow.cli.engine_args import engine_kwargs
    from kvflow.config import EngineConfig

    for method in methods:
        ns = namespace_for(method)
        try:
            EngineConfig.create(model_path(ns), dtype=ns.dtype, max_model_len=ns.max_model_len, device=ns.device,
                                seed=ns.seed, **engine_kwargs(ns))
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"kvflow: error: --compare-kv {method.name}: {exc}") from None
