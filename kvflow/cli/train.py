"""`kvflow train --preset tiny|smoke --out DIR` (a model and its distilled draft), or
`kvflow train --preset tiny-retrieval [--teacher DIR]` (SpeContext's retrieval head, distilled from a
trained model's attention)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from kvflow.train.presets import PRESETS
    from kvflow.train.retrieval import RETRIEVAL_PRESETS

    parser.add_argument("--preset", choices=sorted([*PRESETS, *RETRIEVAL_PRESETS]), default="tiny")
    parser.add_argument("--out", type=Path, default=Path("models/train"),
                        help="output folder: <out>/<preset>, <out>/<preset>-draft, <out>/work (checkpoints)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="retrieval presets: the model whose attention is distilled (default: the preset's, "
                             "the shipped tiny for tiny-retrieval)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvflow.train.presets import PRESETS
    from kvflow.train.retrieval import RETRIEVAL_PRESETS, run_retrieval_training

    if args.preset in RETRIEVAL_PRESETS:
        preset = RETRIEVAL_PRESETS[args.preset]
        teacher = args.teacher
        if teacher is None and preset.teacher:
            from kvflow.assets import shipped_model_path

            teacher = shipped_model_path(preset.teacher)
        if teacher is None:
            print(f"kvflow: error: --preset {args.preset} needs --teacher DIR (the model to distil)")
            return 2
        report = run_retrieval_training(preset, Path(teacher), args.out, show_progress=not args.no_progress,
                                        threads=args.threads)
        print(json.dumps({k: report[k] for k in ("parameters", "final_loss", "heldout_captured_mass",
                                                 "command_wall_seconds")}, indent=2))
        return 0
    if args.teacher is not None:
        print(f"kvflow: error: --teacher is for the retrieval presets ({', '.join(RETRIEVAL_PRESETS)})")
        return 2
    from kvflow.train.pipeline import run_training

    report = run_training(PRESETS[args.preset], args.out, show_progress=not args.no_progress, threads=args.threads)
    print(json.dumps({k: report[k] for k in ("teacher", "draft", "corpus", "command_wall_seconds")}, indent=2))
    return 0
