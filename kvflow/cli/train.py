"""`kvflow train --preset tiny|smoke --out DIR` (a model and its distilled draft), `--preset tiny-longconv`
(a long-convolution model on tiny's data),
`kvflow train --preset tiny-retrieval [--teacher DIR]` (SpeContext's retrieval head, distilled from a
trained model's attention), or `kvflow train --finetune [--from DIR] --method lora|top-layers --slice
prose|code --out DIR` (a fine-tuned variant to serve beside its base)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from kvflow.train.longconv import LONGCONV_PRESETS
    from kvflow.train.presets import PRESETS
    from kvflow.train.retrieval import RETRIEVAL_PRESETS

    parser.add_argument("--preset", choices=sorted([*PRESETS, *RETRIEVAL_PRESETS, *LONGCONV_PRESETS]), default="tiny")
    parser.add_argument("--out", type=Path, default=Path("models/train"),
                        help="output folder: <out>/<preset>, <out>/<preset>-draft, <out>/work (checkpoints)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="retrieval presets: the model whose attention is distilled (default: the preset's, "
                             "the shipped tiny for tiny-retrieval)")
    tune = parser.add_argument_group("fine-tuning (--finetune): a variant of a trained model on one corpus slice")
    tune.add_argument("--finetune", action="store_true", help="fine-tune --from DIR instead of training a preset")
    tune.add_argument("--from", dest="base", type=Path, default=None,
                      help="the model to fine-tune (default: the shipped tiny)")
    tune.add_argument("--method", choices=("lora", "top-layers"), default="lora",
                      help="lora: a PEFT LoRA adapter; top-layers: a full model with only its top layers trained")
    tune.add_argument("--slice", choices=("prose", "code"), default="code",
                      help="the corpus slice to train on: prose (pydoc topics) or code (the standard library)")
    tune.add_argument("--steps", type=int, default=200)
    tune.add_argument("--lora-rank", type=int, default=8)
    tune.add_argument("--lora-alpha", type=int, default=16)
    tune.add_argument("--top-layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvflow.train.longconv import LONGCONV_PRESETS, run_longconv_training
    from kvflow.train.presets import PRESETS
    from kvflow.train.retrieval import RETRIEVAL_PRESETS, run_retrieval_training

    if args.finetune:
        return _finetune(args)
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
    if args.preset in LONGCONV_PRESETS and args.teacher is None:  # a long-conv model (kvflow/train/longconv.py)
        report = run_longconv_training(LONGCONV_PRESETS[args.preset], args.out, not args.no_progress, args.threads)
        print(json.dumps({k: report[k] for k in ("model", "corpus", "command_wall_seconds")}, indent=2))
        return 0
    if args.teacher is not None:
        print(f"kvflow: error: --teacher is for the retrieval presets ({', '.join(RETRIEVAL_PRESETS)})")
        return 2
    from kvflow.train.pipeline import run_training

    report = run_training(PRESETS[args.preset], args.out, show_progress=not args.no_progress, threads=args.threads)
    print(json.dumps({k: report[k] for k in ("teacher", "draft", "corpus", "command_wall_seconds")}, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    """`--finetune`: writes the variant to --out (a PEFT adapter directory, or a model directory)."""
    from kvflow.assets import default_model_path
    from kvflow.train.finetune import FinetuneSettings, run_finetune

    settings = FinetuneSettings(slice=args.slice, method=args.method, steps=args.steps, lora_rank=args.lora_rank,
                                lora_alpha=args.lora_alpha, top_layers=args.top_layers)
    base = Path(args.base) if args.base is not None else Path(default_model_path())
    report = run_finetune(base, args.out, settings, show_progress=not args.no_progress, threads=args.threads)
    print(json.dumps({k: report[k] for k in ("trainable_parameters", "heldout_perplexity_before",
                                             "heldout_perplexity_after", "command_wall_seconds")}, indent=2))
    return 0
