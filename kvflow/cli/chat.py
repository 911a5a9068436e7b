"""`kvflow chat [--message TEXT ...] [--system TEXT]`: chat through the model's chat template;
interactive when no --message is given."""

from __future__ import annotations

import argparse

from kvflow.cli.engine_args import add_engine_args, add_sampling_args, check_sampling_args, make_llm, sampling_params


def configure(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--system", help="system message")
    parser.add_argument("--message", action="append", help="user turn (repeatable); interactive if omitted")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)  # before the model loads
    llm = make_llm(args)
    params = sampling_params(llm, args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    turns = args.message or []
    interactive = not turns
    while True:
        if interactive:
            try:
                text = input("> ")
            except EOFError:
                return 0
        elif turns:
            text = turns.pop(0)
        else:
            return 0
        messages.append({"role": "user", "content": text})
        reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        print(reply)
        messages.append({"role": "assistant", "content": reply})
