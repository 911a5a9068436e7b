"""What every engine command shares: the model and engine flags (generated from the config
dataclasses, so a new knob needs no CLI code), the sampling flags, and the offline `LLM` they build."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

_HELP = {
    "block_size": "tokens per KV block (default 16; 32 with kivi4/kivi2)",
    "kv_cache_memory": "GiB for the KV cache (default: 30%% of available memory, at most 4 GiB)",
    "num_blocks": "exact number of KV blocks (overrides --kv-cache-memory)",
    "enable_prefix_caching": "reuse KV blocks of earlier prompts with the same prefix",
    "kv_cache_dtype": "what KV blocks store: auto (the model's dtype), bfloat16, float16, float32, int8 (a scale "
                      "per token and kv head), fp8_e4m3 (a scale per layer and kv head), or kivi4 / kivi2 (KIVI: "
                      "4-/2-bit codes, keys per channel and values per token in groups of 32; blocks of 32 tokens)",
    "kv_residual_tokens": "kivi4/kivi2: newest tokens per sequence kept in the model's dtype (a multiple of 32)",
    "kv_scale": "fp8_e4m3: the scale of every layer's keys and values (default: calibrated from the first "
                "prompt)",
    "kv_policy": "what each sequence keeps of its KV: none, streaming (sinks + recent window), h2o (heavy "
                 "hitters + recent), snapkv (prompt tokens chosen by its last queries), quest (reads only the "
                 "best blocks each decode step) or specontext (a retrieval head distilled from the model chooses "
                 "the tokens every layer reads each decode step); requests may override it",
    "kv_budget": "tokens each sequence keeps (streaming, h2o, snapkv) or reads per decode step (quest, "
                 "specontext)",
    "retrieval_model": "specontext: the retrieval head directory (default: the shipped one, for the shipped "
                       "model); with another --kv-policy, lets requests choose specontext",
    "kv_resident_memory": "specontext, CPU (Linux): GiB of memory the KV blocks may occupy; the pool "
                          "(--kv-cache-memory) may be larger: as sequences grow, the upper layers' KV of their older "
                          "blocks moves to a file (--kv-spill-dir) and their pages go back to the OS",
    "kv_spill_dir": "with --kv-resident-memory: directory of the file that holds the moved KV (default: the "
                    "system's temporary directory; a local SSD)",
    "kv_sink_tokens": "first tokens always kept or read (attention sinks)",
    "kv_window": "newest tokens always kept or read (snapkv: its observation window, default 32; streaming: "
                 "budget - sinks; h2o: half of budget - sinks; quest: 0)",
    "kv_offload_dir": "KV offload: keep completed KV blocks in a file tier under this directory (local SSD), "
                      "behind the working pool and across restarts; a prefix found there is loaded, not recomputed",
    "kv_offload_size": "KV offload: GiB the file tier may hold (default 16; at most the disk's free space), least "
                       "recently used evicted first",
    "kv_offload_host_size": "KV offload: GiB of a host-memory tier in front of the file tier (default 0: none; "
                            "on a GPU, pinned host memory)",
    "kv_offload_io": "KV offload file tier: direct (O_DIRECT), buffered (through the page cache) or auto (whichever "
                     "reads a cold file faster when the tier opens)",
    "kv_offload_load": "KV offload: auto (load a tier hit when the measured load time beats recomputing it) or "
                       "always",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "token budget of one step",
    "enable_chunked_prefill": "split long prompts over several steps",
    "policy": "waiting-queue policy: fcfs, priority (lowest value first) or lpm (longest cached prefix first; "
              "--starvation-limit bounds the wait)",
    "starvation_limit": "lpm: times the oldest waiting request may be passed over before it goes next "
                        "(default 32)",
    "batch_policy": "how a batch arriving at once is ordered: fcfs, prefix-tree (BatchLLM: grouped by shared "
                    "prefix, each prefix computed once and held until its group ends, decode-heavy groups first) "
                    "or auto (prefix-tree for batches of at least --prefix-tree-min-batch; the offline default)",
    "prefix_tree_min_batch": "batch_policy auto: the smallest batch grouped by prefix (default 32)",
    "admission": "what limits admission: seqs (--max-num-seqs running), memory (the KV cache alone, keeping "
                 "--kv-watermark free) or auto (memory while a prefix-tree plan orders the queue; seqs when "
                 "--max-num-seqs is given)",
    "kv_watermark": "memory admission: fraction of KV blocks left free after an admission (default 0.05)",
    "mixed_batching": "prompt chunks and decodes share steps (off: prompts run alone, as in vLLM v0)",
    "prepack_weights": "bf16 on CPU: prepack linear weights for oneDNN (same outputs, faster)",
    "cpu_kernels": "CPU: run each step's decoder stack as one C++ call (compiled on first use)",
    "decode_gemv": "bf16 CPU with AVX512-BF16: a second copy of the weights for a faster decode GEMV "
                   "(steps of <= 4 tokens)",
    "shared_prefix_attention": "decodes that share prefix-cached KV blocks read them once per group (C++ forward, "
                               "Triton); off: each decode reads its whole context",
    "quant_activations": "q8_0/q4_0/q4_k weights: exact (float activations, default) or q8 (llama.cpp's "
                         "arithmetic: activations rounded to int8 per block of 32; lossy, faster decode)",
    "attention_backend": "auto (Triton kernels on CUDA, torch-native + C++ forward on CPU), torch or triton",
    "speculative_method": "speculative decoding: ngram (prompt lookup) or draft (a small model, "
                          "--speculative-model); outputs keep the model's distribution (greedy: the same tokens)",
    "speculative_model": "draft: a model directory with the target's vocabulary",
    "num_speculative_tokens": "tokens proposed per request and step (default 4)",
    "prompt_lookup_min": "ngram: shortest suffix matched earlier in the prompt and output (default 1)",
    "prompt_lookup_max": "ngram: longest suffix matched (default 4; longer matches are tried first)",
    "quantization": "quantise a dense checkpoint's linear layers as they load (round to nearest): q8_0, q4_0, "
                    "q4_k (llama.cpp's blocks), int8 (per output channel) or bipolar (n-bit bipolar-INT); the "
                    "embedding and LM head stay dense (see --quantization-lm-head). A kvflow-quantised directory "
                    "loads quantised without it",
    "quantization_lm_head": "with --quantization: quantise the LM head too, in the same format and activations "
                            "(lossy; a tied head keeps the embedding's dense matrix for the lookup)",
    "quantization_bits": "bipolar: bits per weight, 2..8 (default 4); the other formats fix their own",
    "quantization_group_size": "bipolar: weights per scale and offset along K, a multiple of 8 (default 64)",
    "quantization_activation_bits": "int8: 8 runs W8A8 (per-token int8 activations; default W8A16); bipolar: "
                                    "2..8 runs the A-bit bit-plane variant (default float activations)",
    "enable_lora": "serve LoRA adapters (PEFT's format) per request, beside the base model in the same steps",
    "lora_modules": "adapters served from the start, NAME=DIR ... (the API's `model` field selects one by NAME)",
    "max_loras": "adapters resident at once (default 4): requests for another wait for a free slot",
    "max_lora_rank": "largest adapter rank served (default 16); slots are sized for it",
    "max_cpu_loras": "adapters kept loaded in host memory, least recently used dropped first (default "
                     "max(max_loras, 16))",
    "zoo_share_kv": "store the KV of a variant's leading layers that equal the base's once for the base and its "
                    "variants (the cache is split into layer groups; default on)",
    "variant": "BlockLLM's block zoo: fine-tuned variants of the model served beside it, NAME=DIR ... (each layer "
               "a variant did not change is stored and run once, the base's; the API's `model` field selects one)",
    "speculative_token_budget": "proposals verified per step across the batch: each of B decoding requests "
                                "verifies at most budget // B (default 8; speculation turns off past 8 requests)",
}


def _engine_parts() -> tuple[type, ...]:
    """The config dataclasses whose fields are engine flags (imported here: kvflow.config needs torch)."""
    from kvflow.config import (
        CacheConfig,
        LoadConfig,
        LoRAConfig,
        RunnerConfig,
        SchedulerConfig,
        SpeculativeConfig,
        ZooConfig,
    )

    return CacheConfig, SchedulerConfig, RunnerConfig, SpeculativeConfig, LoadConfig, LoRAConfig, ZooConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model and engine flags shared by every command that runs the engine."""
    parser.add_argument("--model", help="Hugging Face model directory (config.json, *.safetensors, tokenizer) or a "
                        "llama-architecture .gguf file; default: the shipped tiny model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (or .gguf file) to use instead of "
                        "the model's own")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")
    add_engine_config_args(parser)


def add_engine_config_args(parser: argparse.ArgumentParser) -> None:
    """The engine's own flags, one per config field (default None: the config's default), for commands that
    define the model flags themselves (`kvflow bench profile`); read back with `engine_kwargs`."""
    group = parser.add_argument_group("engine")
    for part in _engine_parts():
        hints = typing.get_type_hints(part)
        for f in dataclasses.fields(part):
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            if hint is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(f.name))
                continue
            if typing.get_origin(hint) is tuple:  # a list of values: --lora-modules a=DIR b=DIR
                group.add_argument(flag, nargs="+", default=None, metavar="VALUE", help=_HELP.get(f.name))
                continue
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            group.add_argument(flag, type=base, default=None, help=_HELP.get(f.name))


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "tokenizer", None) is not None:
        kwargs["tokenizer"] = args.tokenizer
    for part in _engine_parts():
        for f in dataclasses.fields(part):
            value = getattr(args, f.name, None)
            if value is not None:
                kwargs[f.name] = value
    return kwargs


def model_path(args: argparse.Namespace) -> str:
    """--model, else the shipped model (with a clear error where it is missing)."""
    if args.model:
        return str(args.model)
    from kvflow.assets import default_model_path

    try:
        path = Path(default_model_path())
    except FileNotFoundError as exc:
        raise SystemExit(f"kvflow: error: {exc}") from None
    if not (path / "config.json").is_file():
        raise SystemExit(f"kvflow: error: the default model at {path} is missing; pass --model DIR")
    return str(path)


def make_llm(args: argparse.Namespace):
    from kvflow.llm import LLM

    return LLM(model=model_path(args), dtype=args.dtype, max_model_len=args.max_model_len, device=args.device,
               seed=args.seed, **engine_kwargs(args))


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens generated per completion")
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--n", type=int, default=1, help="completions per prompt")
    parser.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object per output")


#: SamplingParams fields set by a sampling flag, and the flag (where it is not the field's name).
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "n", "stop")
_SAMPLING_FLAGS = {"seed": "--sample-seed"}


def _given_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling values the command line sets (flags left out keep the model's defaults)."""
    given = {key: getattr(args, key) for key in _SAMPLING_FIELDS if getattr(args, key) is not None}
    given["seed"] = args.sample_seed
    given["ignore_eos"] = args.ignore_eos
    return given


def _sampling_error(exc: Exception, given: dict[str, Any]) -> ValueError:
    """pydantic's ValidationError (several lines, the input repeated, a documentation URL) as one line
    per bad value, naming the flag that set it: `--temperature: must be a finite number >= 0 ...`."""
    lines = []
    for error in exc.errors():  # type: ignore[attr-defined]
        cause = error.get("ctx", {}).get("error")
        text = str(cause) if cause is not None else error["msg"]
        field = str(error["loc"][0]) if error.get("loc") else ""
        if field in given:
            text = text.removeprefix(f"{field} ")
            lines.append(f"{_SAMPLING_FLAGS.get(field, '--' + field.replace('_', '-'))}: {text}")
        else:
            lines.append(f"the model's default sampling parameters (generation_config.json): {text}")
    return ValueError("; ".join(lines))


def _sampling(params: dict[str, Any], given: dict[str, Any]):
    from pydantic import ValidationError

    from kvflow.sampling_params import SamplingParams

    try:
        return SamplingParams(**params)
    except ValidationError as exc:
        raise _sampling_error(exc, given) from None


def check_sampling_args(args: argparse.Namespace) -> None:
    """Validate the sampling flags on their own, before the model loads, so a bad value fails at once
    rather than after the load (seconds to minutes)."""
    given = _given_sampling(args)
    _sampling(given, given)


def sampling_params(llm, args: argparse.Namespace):
    """The model's default sampling parameters with the command line's on top; ValueError names a bad flag."""
    given = _given_sampling(args)
    return _sampling({**llm.default_sampling_params().model_dump(), **given}, given)


def print_outputs(outputs, as_json: bool) -> None:
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
