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

from kvflow.cli.engine_args import add_engine_args, make_llm, model_path


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
    group.add_argument("--compare-kv", type=_list_of(str, "--compare-kv"), default=None, metavar="FORMATS",
                       help="evaluate under each of these --kv-cache-dtype values (comma-separated, e.g. "
                            "auto,int8,fp8_e4m3) and write a table and a figure of accuracy against KV bytes "
                            "(kv_compare.json/.png in --out; each format's results in --out/FORMAT)")
    group.add_argument("--rerun", action="store_true",
                       help="with --compare-kv: evaluate every format again instead of reusing results saved in "
                            "--out/FORMAT with the same settings")
    group.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    group.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvflow.eval.report import format_report, save_results
    from kvflow.eval.runner import EvalConfig, run_eval

    config = EvalConfig(
        tasks=args.tasks, lengths=args.lengths, depths=args.depths, trials=args.trials, pairs=args.pairs,
        multikey_lengths=args.multikey_lengths, queries=args.queries, ppl_context=args.ppl_context,
        ppl_tokens=args.ppl_tokens, unigram=not args.no_unigram, heldout_percent=args.heldout_percent,
        max_source_files=args.max_source_files, seed=args.seed,
        cache_dir=None if args.no_cache else str(args.cache_dir), progress=not args.no_progress,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.compare_kv:
        return _compare_kv(args, config)
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


def _compare_kv(args: argparse.Namespace, config) -> int:
    from kvflow.config import KV_CACHE_DTYPES
    from kvflow.eval.kv_compare import compare_kv_formats, format_comparison, save_comparison

    unknown = [f for f in args.compare_kv if f not in KV_CACHE_DTYPES]
    if unknown:
        raise SystemExit(f"error: --compare-kv: unknown format(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(KV_CACHE_DTYPES)}")
    if args.draft is not None:
        raise SystemExit("error: --compare-kv and --draft are separate evaluations; run them one at a time")
    model = model_path(args)
    out = args.out or Path("eval_results") / f"{Path(model).name or 'model'}-kv"

    def llm_for(fmt: str):
        return make_llm(argparse.Namespace(**{**vars(args), "kv_cache_dtype": fmt}))

    rows = compare_kv_formats(llm_for, model, args.dtype, list(args.compare_kv), config, out, reuse=not args.rerun,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_comparison(rows, baseline=args.compare_kv[0]))
    json_path, png_path = save_comparison(rows, out, f"{Path(model).name}: accuracy against KV bytes per token "
                                                     f"(model dtype {args.dtype})")
    print(f"wrote {json_path}, {png_path}")
    return 0
