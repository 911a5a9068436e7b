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


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default (`(default: 8000)`), except where there is none (None, an off
    switch's False, "") or the help already says it (so an environment variable's value, e.g. --api-key's, is
    never printed). A flag without help text shows nothing: give it one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or default is False or default == ""
                or not action.option_strings or "default" in text.lower()):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed, and the arguments of `command` alone (None: of none). Each
    command's parser sets `command_parser` to itself (main reports unknown arguments with it)."""
    parser = argparse.ArgumentParser(prog="kvflow", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, module) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        command_parser.set_defaults(command_parser=command_parser)
        if name == command:
            importlib.import_module(f"kvflow.cli.{module}").configure(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a ValueError from it is one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args, unknown = build_parser(command).parse_known_args(argv)
    command_parser = args.__dict__.pop("command_parser")  # the commands see only their own arguments
    if unknown:  # with the command's usage, not the top level's (argparse's parse_args would give that)
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"kvflow: error: {exc}", file=sys.stderr)
        return 2
