"""`kvflow generate --prompt TEXT [--prompts-file FILE] [sampling and engine flags]`: offline completion."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvflow.cli.engine_args import (
    add_engine_args,
    add_sampling_args,
    check_sampling_args,
    make_llm,
    print_outputs,
    sampling_params,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", help="a file with one prompt per line")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("kvflow: error: give --prompt TEXT (repeatable) or --prompts-file FILE")
    check_sampling_args(args)  # before the model loads
    llm = make_llm(args)
    outputs = llm.generate(prompts, sampling_params(llm, args), use_tqdm=len(prompts) > 1)
    print_outputs(outputs, args.json)
    stats = llm.engine.stats()
    if stats.prefix_tree_batches:  # on stderr: stdout holds the outputs (--json parses it)
        print(f"prefix tree: {stats.prefix_tree_groups} groups share a prefix, R_saving "
              f"{stats.prefix_tree_saving_ratio:.1%} (a multi-level tree: "
              f"{stats.prefix_tree_optimal_saving_ratio:.1%}); peak KV blocks {stats.peak_used_blocks} of "
              f"{stats.num_blocks}", file=sys.stderr)
    return 0
