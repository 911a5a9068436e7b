"""`kvflow train --preset tiny|smoke --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from kvflow.train.presets import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, default=Path("models/train"),
                        help="output folder: <out>/<preset>, <out>/<preset>-draft, <out>/work (checkpoints)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvflow.train.pipeline import run_training
    from kvflow.train.presets import PRESETS

    report = run_training(PRESETS[args.preset], args.out, show_progress=not args.no_progress, threads=args.threads)
    print(json.dumps({k: report[k] for k in ("teacher", "draft", "corpus", "command_wall_seconds")}, indent=2))
    return 0
