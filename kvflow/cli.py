"""The `kvflow` command: one entry point, one subcommand per job.

Engine flags are generated from the config dataclasses, so a new knob needs no CLI code. Only the
module of the command being run is imported (see `COMMANDS`), so `kvflow --help` and `kvflow serve`
never load the benchmark, simulator, evaluation or training code, nor what only they depend on.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvflow.assets import default_model_path

_HELP = {
    "block_size": "tokens per KV block",
    "kv_cache_memory": "GiB for the KV cache (default: 30%% of available memory, at most 4 GiB)",
    "num_blocks": "exact number of KV blocks (overrides --kv-cache-memory)",
    "enable_prefix_caching": "reuse KV blocks of earlier prompts with the same prefix",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "token budget of one step",
    "enable_chunked_prefill": "split long prompts over several steps",
    "policy": "waiting-queue policy: fcfs or priority",
    "prepack_weights": "bf16 on CPU: prepack linear weights for oneDNN (same outputs, faster)",
    "cpu_kernels": "CPU: run each step's decoder stack as one C++ call (compiled on first use)",
    "decode_gemv": "bf16 CPU with AVX512-BF16: a second copy of the weights for a faster decode GEMV "
                   "(steps of <= 4 tokens)",
    "attention_backend": "auto (Triton kernels on CUDA, torch-native + C++ forward on CPU), torch or triton",
}


def _engine_parts() -> tuple[type, ...]:
    """The config dataclasses whose fields are engine flags (imported here: kvflow.config needs torch)."""
    from kvflow.config import CacheConfig, RunnerConfig, SchedulerConfig

    return CacheConfig, SchedulerConfig, RunnerConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model and engine flags shared by every command that runs the engine."""
    parser.add_argument("--model", help="Hugging Face model directory (config.json, *.safetensors, tokenizer); "
                        "default: the shipped tiny model")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")
    group = parser.add_argument_group("engine")
    for part in _engine_parts():
        hints = typing.get_type_hints(part)
        for f in dataclasses.fields(part):
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            if hint is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(f.name))
                continue
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            group.add_argument(flag, type=base, default=None, help=_HELP.get(f.name))


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for part in _engine_parts():
        for f in dataclasses.fields(part):
            value = getattr(args, f.name, None)
            if value is not None:
                kwargs[f.name] = value
    return kwargs


def _make_llm(args: argparse.Namespace):
    from kvflow.llm import LLM

    return LLM(
        model=args.model or str(default_model_path()), dtype=args.dtype, max_model_len=args.max_model_len,
        device=args.device, seed=args.seed, **engine_kwargs(args),
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object per output")


def _sampling_params(llm, args: argparse.Namespace):
    params = llm.default_sampling_params().model_dump()
    for key in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "n", "stop"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    params["seed"] = args.sample_seed
    params["ignore_eos"] = args.ignore_eos
    from kvflow.sampling import SamplingParams

    return SamplingParams(**params)


def _print_outputs(outputs, as_json: bool) -> None:
    for out in outputs:
        for completion in out.outputs:
            if as_json:
                print(json.dumps({
                    "prompt": out.prompt, "index": completion.index, "text": completion.text,
                    "token_ids": completion.token_ids, "finish_reason": completion.finish_reason,
                }))
            else:
                tag = f" [{completion.index}]" if len(out.outputs) > 1 else ""
                print(f"--- prompt{tag}: {out.prompt!r}\n{completion.text}\n({completion.finish_reason}, "
                      f"{len(completion.token_ids)} tokens)")


def _cmd_generate(args: argparse.Namespace) -> int:
    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or --prompts-file FILE")
    llm = _make_llm(args)
    outputs = llm.generate(prompts, _sampling_params(llm, args), use_tqdm=len(prompts) > 1)
    _print_outputs(outputs, args.json)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(llm, args)
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


def configure_generate(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    _add_sampling_args(parser)
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", help="a file with one prompt per line")
    parser.set_defaults(func=_cmd_generate)


def configure_chat(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    _add_sampling_args(parser)
    parser.add_argument("--system", help="system message")
    parser.add_argument("--message", action="append", help="user turn (repeatable); interactive if omitted")
    parser.set_defaults(func=_cmd_chat)


# Each command: its one-line help and the function ("module:name") that adds its arguments and sets
# `func`. Only the function of the command being run is imported.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("complete prompts offline", "kvflow.cli:configure_generate"),
    "chat": ("chat with the model using its chat template", "kvflow.cli:configure_chat"),
    "serve": ("OpenAI-compatible HTTP server", "kvflow.server.cli:configure_serve"),
    "bench": ("benchmarks: reference models, limits, throughput, serving load", "kvflow.bench.cli:configure_bench"),
    "train": ("train the tokenizer, a small Llama model and its distilled draft", "kvflow.train.cli:configure_train"),
    "eval": ("quality harness: held-out perplexity, passkey and multi-key retrieval accuracy",
             "kvflow.eval.cli:configure_eval"),
    "profile": ("measure this machine's iteration latency and fit a latency model", "kvflow.sim.cli:configure_profile"),
    "simulate": ("simulate a workload on profiled instances (or replay a recorded run)",
                 "kvflow.sim.simulate_cli:configure_simulate"),
    "plan": ("choose prefill/decode instances, parallelism and ratio for SLOs (simulated)",
             "kvflow.sim.plan_cli:configure_plan"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed, and the arguments of `command` alone (None: of none)."""
    parser = argparse.ArgumentParser(prog="kvflow", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, target) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(command_parser)
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


if __name__ == "__main__":
    sys.exit(main())
