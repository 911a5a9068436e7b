"""The `kvflow` command: one entry point, one module per subcommand.

Each module here defines `configure(parser)`, which adds the command's arguments and sets `func`,
the function the command runs. Only the module of the command being run is imported (see
`COMMANDS`), so `kvflow --help` loads no third-party module and `kvflow serve` never loads the
benchmark, simulator, evaluation or training code, nor what only they depend on. Nothing in kvflow
imports this package: it sits on top of every layer it drives.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each command: its one-line help, and the module under kvflow.cli that configures and runs it.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("complete prompts offline", "generate"),
    "chat": ("chat with the model using its chat template", "chat"),
    "serve": ("OpenAI-compatible HTTP server", "serve"),
    "bench": ("benchmarks: reference models, limits, throughput, serving load", "bench"),
    "train": ("train the tokenizer, a small Llama model and its distilled draft", "train"),
    "quantize": ("quantise a model's weights (GGUF q8_0/q4_0/q4_k, int8, bipolar-INT; RTN or AWQ)", "quantize"),
    "eval": ("quality harness: held-out perplexity, passkey and multi-key retrieval accuracy", "eval"),
    "profile": ("measure this machine's iteration latency and fit a latency model", "profile"),
    "simulate": ("simulate a workload on profiled instances (or replay a recorded run)", "simulate"),
    "plan": ("choose prefill/decode instances, parallelism and ratio for SLOs (simulated)", "plan"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed, and the arguments of `command` alone (None: of none)."""
    parser = argparse.ArgumentParser(prog="kvflow", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, module) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(f"kvflow.cli.{module}").configure(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
