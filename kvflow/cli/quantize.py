"""`kvflow quantize --model DIR --format FMT [--bits N] [--group G] [--method rtn|awq] [--lm-head] --out DIR
[--gguf FILE]`.

Quantises a model directory's linear projections (kvflow/model/quant/quantize_model.py) and writes a
directory kvflow loads (`--model OUT`), and/or a GGUF file llama.cpp loads. `--method awq` calibrates
on windows of the training corpus' train split (CPython's docs and standard library; the held-out
documents the quality figures score are never used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from kvflow.config import QUANT_FORMATS
    from kvflow.model.quant.quantize_model import METHODS

    parser.add_argument("--model", help="Hugging Face model directory (default: the shipped tiny model)")
    parser.add_argument("--format", required=True, choices=QUANT_FORMATS, help="weight format")
    parser.add_argument("--bits", type=int, default=None, help="bipolar: bits per weight, 2..8 (default 4)")
    parser.add_argument("--group", type=int, default=None, help="bipolar: weights per scale/offset group along K")
    parser.add_argument("--method", choices=METHODS, default="rtn",
                        help="rtn: round to nearest; awq: activation-aware scales calibrated on the train split")
    parser.add_argument("--calibration-samples", type=int, default=64, help="awq: windows of calibration text")
    parser.add_argument("--calibration-length", type=int, default=512, help="awq: tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="awq: which windows are drawn")
    parser.add_argument("--out", type=Path, default=None, help="output model directory")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="also (or only) write a GGUF file here (q8_0, q4_0, q4_k), loadable by llama.cpp")
    parser.add_argument("--lm-head", action="store_true",
                        help="quantise the LM head too (lossy; a tied head gets a quantised copy, the embedding "
                             "stays dense)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvflow.cli.engine_args import model_path
    from kvflow.model.quant.quantize_model import quantize_checkpoint

    if args.out is None and args.gguf is None:
        raise SystemExit("kvflow: error: give --out DIR (a kvflow model directory) and/or --gguf FILE")
    model = model_path(args)
    params = {k: v for k, v in (("bits", args.bits), ("group_size", args.group)) if v is not None}
    if params and args.format != "bipolar":
        raise SystemExit(f"kvflow: error: --bits and --group apply to bipolar; {args.format} has a fixed layout")
    calibration = _calibration(model, args) if args.method == "awq" else None
    report = quantize_checkpoint(model, args.format, params=params, method=args.method, calibration=calibration,
                                 out_dir=args.out, gguf_path=args.gguf, lm_head=args.lm_head,
                                 progress=_progress(args.no_progress))
    fallbacks = sorted({f for f in report.quantized.values() if f != args.format})
    projections = sum(name != "lm_head.weight" for name in report.quantized)
    head = f" and the LM head ({report.lm_head})" if report.lm_head != "dense" else ""
    print(f"{args.format} ({args.method}{', ' + json.dumps(params) if params else ''}): "
          f"{projections} projections{head} quantised, {report.bits_per_weight:.2f} bits/weight in the projections, "
          f"{report.model_bits_per_weight:.2f} over the whole model; relative weight error "
          f"{report.weight_error:.4f}; {report.seconds:.1f} s")
    if fallbacks:
        print(f"  layers whose width {args.format} cannot split took {', '.join(fallbacks)}")
    if report.dense:
        print(f"  left dense (no format splits their width): {', '.join(report.dense)}")
    print("wrote " + ", ".join(report.outputs))
    return 0


def _calibration(model: str, args: argparse.Namespace):
    import torch

    from kvflow.eval.data import calibration_tokens, resolve_split
    from kvflow.model.loader import load_tokenizer

    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise SystemExit(f"kvflow: error: --method awq calibrates on text, and {model} ships no tokenizer")
    print(f"calibration: {args.calibration_samples} x {args.calibration_length} tokens of the train split",
          file=sys.stderr)
    ids = calibration_tokens(tokenizer, resolve_split(model), args.calibration_samples, args.calibration_length,
                             args.seed)
    return torch.from_numpy(ids)


def _progress(disabled: bool):
    from tqdm import tqdm

    def wrap(items, desc: str):
        return tqdm(list(items), desc=desc, disable=disabled, file=sys.stderr)

    return wrap
