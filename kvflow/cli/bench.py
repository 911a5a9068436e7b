"""`kvflow bench ...`: make reference models, measure machine limits, run throughput, attention and
serving benchmarks (the serving load generator's subcommands are in bench_serve.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kvflow.bench.bitplane import IMPLS as BITPLANE_IMPLS
from kvflow.bench.make_model import SHAPES, TOKENIZERS
from kvflow.bench.quant_gemv import BENCH_FORMATS as QUANT_GEMV_FORMATS
from kvflow.bench.quant_gemv import DEFAULT_FORMATS as QUANT_GEMV_DEFAULT
from kvflow.cli.engine_args import add_engine_config_args, engine_kwargs

_DTYPES = ("bfloat16", "float16", "float32")


def _parse_value(text: str) -> Any:
    """A KEY=VALUE value as JSON when it parses (ints, floats, true/false, null), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_backend_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["kvflow:max_num_seqs=64", ...]`` -> ``{"kvflow": {"max_num_seqs": 64}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        backend, sep, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not sep or not eq or not backend or not key:
            raise argparse.ArgumentTypeError(
                f"--backend-arg expects BACKEND:KEY=VALUE (e.g. kvflow:max_num_seqs=64), got {item!r}"
            )
        out.setdefault(backend, {})[key] = _parse_value(value)
    return out


def parse_python_args(items: list[str]) -> dict[str, str]:
    """``["vllm=/tmp/vllmenv/bin/python"]`` -> ``{"vllm": "/tmp/vllmenv/bin/python"}``."""
    out: dict[str, str] = {}
    for item in items:
        backend, eq, path = item.partition("=")
        if not eq or not backend or not path:
            raise argparse.ArgumentTypeError(
                f"--python expects BACKEND=INTERPRETER (e.g. vllm=/tmp/vllmenv/bin/python), got {item!r}"
            )
        out[backend] = path
    return out


def _cmd_make_model(args: argparse.Namespace) -> int:
    from kvflow.bench.make_model import main_make_model

    main_make_model(args.shape, Path(args.out), seed=args.seed, dtype=args.dtype, tokenizer=args.tokenizer,
                    max_position_embeddings=args.max_position_embeddings)
    return 0


def _cmd_limits(args: argparse.Namespace) -> int:
    from kvflow.bench.limits import format_limits, measure_limits

    _set_threads(args.threads)
    limits = measure_limits(n=args.gemm_n, bw_mib=args.bw_mib, repeats=args.repeats)
    print(format_limits(limits))
    return 0


def _set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads before anything is measured (limits use the same count)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _cmd_throughput(args: argparse.Namespace) -> int:
    from kvflow.bench.shared_prefix_workloads import SharedPrefixSizes
    from kvflow.bench.throughput_report import run_many

    _set_threads(args.threads)

    try:
        backend_kwargs = parse_backend_args(args.backend_arg)
        python = parse_python_args(args.python)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"kvflow: error: {e}") from None
    report = run_many(
        Path(args.model),
        backends=args.backend,
        workloads=args.workload,
        output=args.output,
        backend_kwargs=backend_kwargs,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        dtype=args.dtype,
        seed=args.seed,
        warmup=not args.no_warmup,
        repeats=args.repeats,
        wait_idle_s=args.wait_idle,
        python=python,
        shared_prefix=SharedPrefixSizes(
            groups=args.groups, group_requests=args.group_requests, shared_tokens=args.shared_tokens,
            suffix_tokens=args.suffix_tokens, output_min=args.output_min, output_max=args.output_max,
            length_scale=args.length_scale,
        ),
    )
    return 0 if report["runs"] else 1


def _cmd_to_gguf(args: argparse.Namespace) -> int:
    from kvflow.bench.peers import peer_python
    from kvflow.bench.peers.to_gguf import convert_to_gguf, gguf_cache_path
    from kvflow.bench.throughput import BackendUnavailable

    out = Path(args.out) if args.out else gguf_cache_path(args.model, args.dtype)
    try:
        convert_to_gguf(args.model, out, args.dtype, peer_python("llamacpp", args.python), args.convert_script)
    except (BackendUnavailable, FileNotFoundError) as e:
        raise SystemExit(f"kvflow: error: {e}") from None
    print(f"wrote {out}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from kvflow.bench.profile import format_report, profile_decode, save_report, set_threads

    set_threads(args.threads)
    report = profile_decode(args.model, args.workload, num_prompts=args.num_prompts, input_len=args.input_len,
                            decode_steps=args.steps, dtype=args.dtype, seed=args.seed, top=args.top,
                            engine_kwargs=engine_kwargs(args))
    print(format_report(report))
    if args.output:
        save_report(report, Path(args.output))
        print(f"saved {args.output}")
    return 0


def _cmd_throughput_plot(args: argparse.Namespace) -> int:
    from kvflow.bench.throughput_plot import plot_throughput

    print(f"wrote {plot_throughput([Path(r) for r in args.reports], Path(args.out), args.title)}")
    return 0


def _cmd_kv_capacity(args: argparse.Namespace) -> int:
    from kvflow.bench.kv_capacity import format_capacity, run_capacity, save_capacity
    from kvflow.config import KV_CACHE_DTYPES

    unknown = [f for f in args.kv_cache_dtype if f not in KV_CACHE_DTYPES]
    if unknown:
        raise SystemExit(f"kvflow: error: unknown --kv-cache-dtype {', '.join(unknown)}; "
                         f"choose from {', '.join(KV_CACHE_DTYPES)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = run_capacity(args.model, args.dtype, args.kv_cache_dtype, args.kv_cache_memory, args.num_prompts,
                           args.input_len, args.output_len, args.repeats, args.seed, block_size=args.block_size,
                           max_num_seqs=args.max_num_seqs, residual_tokens=args.kv_residual_tokens,
                           count_only=args.count_only,
                           engine_kwargs=None if args.cpu_kernels is None else {"cpu_kernels": args.cpu_kernels})
    print(format_capacity(results))
    if args.output:
        settings = {k: getattr(args, k) for k in ("model", "dtype", "kv_cache_dtype", "kv_cache_memory", "num_prompts",
                                                  "input_len", "output_len", "repeats", "seed", "block_size",
                                                  "max_num_seqs", "kv_residual_tokens", "count_only",
                                                  "cpu_kernels")}
        save_capacity(results, Path(args.output), settings)
        print(f"saved {args.output}")
    return 0


def _cmd_quant_gemv(args: argparse.Namespace) -> int:
    from kvflow.bench.quant_gemv import format_rows, run

    print(format_rows(run(args.shape, args.rows, tuple(args.formats), args.seconds, args.threads,
                          stream_mib=args.stream_mib, gemv_kernels=tuple(args.kernels)), args.rows))
    return 0


def _cmd_bitplane(args: argparse.Namespace) -> int:
    import os

    import torch

    from kvflow.bench.bitplane import format_results, inaccurate, run, save_results
    from kvflow.bench.quant_gemv import layer_matrices

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print(f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for Triton's interpreter), got {device}")
        return 2
    results = run(layer_matrices(args.shape), tuple(args.bits), tuple(args.rows), args.group, tuple(args.impl),
                  device, getattr(torch, args.dtype), args.repeats, args.stream_mib)
    print(format_results(results))
    if args.output:
        save_results(results, Path(args.output), device, args.shape, args.group, getattr(torch, args.dtype))
        print(f"saved {args.output}")
    bad = inaccurate(results)
    for r in bad:
        print(f"INACCURATE: {r.impl} {r.matrix} n={r.bits} M={r.rows}: relative error {r.rel_err:.2e}")
    return 1 if bad else 0


def _cmd_spec_decode(args: argparse.Namespace) -> int:
    from kvflow.bench.spec_decode import (
        format_spec_report,
        format_verify_cost,
        measure_verify_cost,
        run_spec_bench,
        save_report,
    )

    _set_threads(args.threads)
    model = _model_or_default(args.model)
    if args.verify_cost:
        report = measure_verify_cost(model, args.dtype or "bfloat16", tuple(args.num_speculative_tokens),
                                     tuple(args.batch), context_len=args.context_len, steps=args.steps,
                                     repeats=args.repeats)
        print(format_verify_cost(report))
    else:
        if "draft" in args.method and not args.speculative_model:
            from kvflow.assets import default_draft_path

            args.speculative_model = str(default_draft_path())
        report = run_spec_bench(model, args.dtype or "float32", args.workload, tuple(args.method),
                                tuple(args.num_speculative_tokens), tuple(args.batch), max_tokens=args.max_tokens,
                                prompt_len=args.prompt_len, repeats=args.repeats, num_prompts=args.num_prompts,
                                speculative_model=args.speculative_model, prompt_lookup_min=args.prompt_lookup_min,
                                prompt_lookup_max=args.prompt_lookup_max)
        print(format_spec_report(report))
    if args.out:
        save_report(report, Path(args.out))
        print(f"saved {args.out}")
    return 0 if report.get("outputs_equal") is not False else 1


def _no_cuda(bench: str, device: str) -> bool:
    """True (said on stdout) where `--device cuda` was asked for and torch sees no CUDA device."""
    if device != "cuda":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    print(f"kvflow bench {bench} --device cuda: no CUDA device (torch.cuda.is_available() is False)")
    return True


def _model_or_default(model: str | None) -> str:
    """--model, else the shipped tiny."""
    if model is not None:
        return model
    from kvflow.assets import default_model_path

    return str(default_model_path())


def _finish_report(report: dict[str, Any], text: str, name: str, out: str | None) -> None:
    """Record the command line in `report`, print `text`, and save the report as JSON at `out` (if given)."""
    report["command"] = f"kvflow bench {name} " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", name] else [])
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"saved {out}")


def _cmd_specontext(args: argparse.Namespace) -> int:
    import tempfile

    from kvflow.bench.specontext import format_report, run_specontext_bench, save_report

    if _no_cuda("specontext", args.device):
        return 2
    _set_threads(args.threads)
    dtype = args.dtype or "float32"
    made = f"random-weight {args.shape} (kvflow bench make-model --shape {args.shape}, seed 0)"

    def checkpoint(partial: dict[str, Any]) -> None:  # what a run cut short still leaves
        if args.out:
            save_report({**partial, "model": made if args.model is None and args.shape else partial["model"],
                         "partial": True}, Path(args.out))

    with tempfile.TemporaryDirectory(prefix="kvflow-bench-specontext-") as work:
        if args.model is None and args.shape:
            from kvflow.bench.make_model import main_make_model, shape_params

            # Long enough for every prompt and its outputs (the shape's own context may be shorter).
            positions = max(shape_params(args.shape)["max_position_embeddings"],
                            -(-(args.prompt_len + args.max_tokens + 1) // 256) * 256)
            model = str(main_make_model(args.shape, Path(work) / f"model-{args.shape}", dtype=dtype,
                                        tokenizer="auto", max_position_embeddings=positions))
        else:
            model = _model_or_default(args.model)
        if args.resident_memory is not None:  # the edge setting: one long generation, KV memory capped
            from kvflow.bench.specontext_edge import format_edge_report, run_edge_bench

            results = run_edge_bench(model, dtype, args.prompt_len, args.max_tokens, args.budget,
                                     args.resident_memory, args.retrieval_model, args.spill_dir,
                                     block_size=args.block_size, repeats=args.repeats)
            format_report = format_edge_report  # noqa: F811 - this run's report
        else:
            results = run_specontext_bench(model, dtype, tuple(args.batch), args.prompt_len,
                                           args.max_tokens, args.budget, tuple(args.method), args.repeats,
                                           args.retrieval_model, hf=not args.no_hf, device=args.device,
                                           checkpoint=checkpoint)
    if args.model is None and args.shape:
        results["model"] = made
    print(format_report(results))
    if args.out:
        save_report(results, Path(args.out))
        print(f"saved {args.out}")
    return 0


def _cmd_lora(args: argparse.Namespace) -> int:
    import tempfile

    from kvflow.bench.lora import format_report, run_lora_bench

    if _no_cuda("lora", args.device):
        return 2
    dtype = args.dtype or "bfloat16"
    with tempfile.TemporaryDirectory(prefix="kvflow-bench-lora-") as work:
        if args.model is None and args.shape:
            from kvflow.bench.make_model import make_model

            model = str(make_model(args.shape, Path(work) / f"model-{args.shape}", dtype=dtype))
        else:
            model = _model_or_default(args.model)
        report = run_lora_bench(model, dtype, args.batch, args.adapters, args.rank, args.prompt_len,
                                args.max_tokens, args.repeats, Path(work) / "adapters", args.threads, args.device)
    if args.model is None and args.shape:
        report["model"] = f"random-weight {args.shape} (kvflow bench make-model --shape {args.shape}, seed 0)"
    _finish_report(report, format_report(report), "lora", args.out)
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    import tempfile

    from kvflow.bench.zoo import format_report, run_zoo_bench

    model = _model_or_default(args.model)
    with tempfile.TemporaryDirectory(prefix="kvflow-bench-zoo-") as work:
        report = run_zoo_bench(Path(model), tuple(args.variants), args.changed_layers, args.requests, args.prompt_len,
                               args.max_tokens, args.dtype or "bfloat16", Path(work), args.cores,
                               system_prompt_len=args.system_prompt_len)
    _finish_report(report, format_report(report), "zoo", args.out)
    return 0


def _cmd_longconv(args: argparse.Namespace) -> int:
    from kvflow.bench.longconv import run_longconv_bench, save_report

    if _no_cuda("longconv", args.device):
        return 2
    if args.device == "cuda" and (not args.no_decode or args.engine_lengths):
        print("--device cuda times the prefill only (decode and --engine-lengths time the CPU module path)")
    _set_threads(args.threads)
    result = run_longconv_bench(args.shape, tuple(args.lengths), tuple(args.contexts), args.repeats, args.direct_max,
                                args.attention_max, args.max_factor, args.dtype, decode=not args.no_decode,
                                engine_lengths=tuple(args.engine_lengths), device=args.device,
                                conv_dtype=args.conv_dtype)
    print(json.dumps(result["state_bytes_per_token"]))
    if args.out:
        command = (f"kvflow bench longconv --shape {args.shape} --lengths {' '.join(map(str, args.lengths))} "
                   f"--contexts {' '.join(map(str, args.contexts))} --direct-max {args.direct_max} --attention-max "
                   f"{args.attention_max} --max-factor {args.max_factor} --dtype {args.dtype} --repeats {args.repeats}"
                   + (" --no-decode" if args.no_decode else "")
                   + (f" --engine-lengths {' '.join(map(str, args.engine_lengths))}" if args.engine_lengths else "")
                   + (f" --threads {args.threads}" if args.threads else "")
                   + (f" --device {args.device}" if args.device != "cpu" else "")
                   + (f" --conv-dtype {args.conv_dtype}" if args.conv_dtype != "float32" else ""))
        save_report(result, Path(args.out), command)
        print(f"saved {args.out}")
    failed = [r for r in result["prefill"] if "error" in r]
    return 1 if failed else 0


def _cmd_kv_offload(args: argparse.Namespace) -> int:
    from kvflow.bench.kv_offload import OffloadBenchConfig, format_table, run, save

    cfg = OffloadBenchConfig(model=args.model, lengths=tuple(args.lengths), tiers=tuple(args.tiers),
                             repeats=args.repeats, dtype=args.dtype or "auto", block_size=args.block_size,
                             threads=args.threads, restart_prompts=args.restart_prompts, restart_len=args.restart_len,
                             offload_dir=args.offload_dir, out_dir=None if args.no_save else args.out_dir)
    try:
        result = run(cfg, log=lambda line: print(line, flush=True))
    except ValueError as exc:
        raise SystemExit(f"kvflow: error: {exc}") from None
    print(format_table(result))
    if cfg.out_dir:
        for path in save(result, cfg.out_dir):
            print(f"saved {path}")
    return 0


def _edge_command(args: argparse.Namespace) -> str:
    """The `kvflow bench edge` command line that reproduces `args` (saved beside the results)."""
    import shlex

    words = ["kvflow", "bench", "edge", "--model", *args.model, "--formats", *args.formats, "--limits", *args.limits,
             "--engines", *args.engines, "--input-len", args.input_len, "--output-len", args.output_len,
             "--repeats", args.repeats, "--seed", args.seed, "--memory-limiter", args.memory_limiter,
             "--watts-per-core", args.watts_per_core, "--wait-idle", args.wait_idle]
    if args.kvflow_quant_activations != "exact":
        words += ["--kvflow-quant-activations", args.kvflow_quant_activations]
    for flag, value in (("--kv-cache-memory", args.kv_cache_memory), ("--kvflow-isa", args.kvflow_isa),
                        ("--python", args.python)):
        if value is not None:
            words += [flag, value]
    return shlex.join(str(w) for w in words)


def _cmd_edge(args: argparse.Namespace) -> int:
    from kvflow.bench.edge import EdgeLimit, format_report, parse_model, run_edge, save_edge

    try:
        models = [parse_model(m) for m in args.model]
        limits = [EdgeLimit.parse(text) for text in args.limits]
        report = run_edge(models, args.formats, limits, args.engines, input_len=args.input_len,
                          output_len=args.output_len, repeats=args.repeats, seed=args.seed, python=args.python,
                          limiter=args.memory_limiter, kv_cache_gib=args.kv_cache_memory,
                          watts_per_core=args.watts_per_core, kvflow_isa=args.kvflow_isa, wait_idle_s=args.wait_idle,
                          quant_activations=args.kvflow_quant_activations, log=lambda line: print(line, flush=True))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"kvflow: error: {exc}") from None
    print(format_report(report))
    if not args.no_save:
        for path in save_edge(report, Path(args.out_dir), _edge_command(args)):
            print(f"saved {path}")
    return 0 if report["runs"] and all(r["status"] == "ok" for r in report["runs"]) else 1


def _cmd_soak(args: argparse.Namespace) -> int:
    from kvflow.bench.soak import SoakConfig, format_report, passed, run_soak

    cfg = SoakConfig(args.base_url.rstrip("/"), num_requests=args.num_requests, concurrency=args.concurrency,
                     seed=args.seed, api_key=args.api_key, model=args.model, max_tokens=args.max_tokens,
                     pids=args.pid or [], duration=args.duration)
    result = run_soak(cfg)
    print(format_report(result))
    ok = passed(result, args.max_memory_growth)
    print("verdict:", "passed" if ok else "FAILED")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"saved {args.out}")
    return 0 if ok else 1


def _cmd_attention(args: argparse.Namespace) -> int:
    import torch

    from kvflow.bench.attention import (
        AttentionCase,
        available,
        check_targets,
        format_checks,
        format_results,
        run_case,
        save_results,
    )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shared_prefix is not None:
        return _shared_prefix_attention(args, device)
    impls = available(device, tuple(args.impl))
    missing = sorted(set(args.impl) - set(impls))
    if missing:
        print(f"not available on {device}: {', '.join(missing)}")
    results = []
    for kind in args.kind:
        for batch in args.batch:
            for heads in args.heads:
                num_heads, _, num_kv_heads = heads.partition("/")
                for seq_len in args.seq_len:
                    case = AttentionCase(kind, batch, seq_len, int(num_heads), int(num_kv_heads or num_heads),
                                         args.head_dim, args.block_size, getattr(torch, args.dtype), device,
                                         args.quest_budget)
                    results += run_case(case, impls, args.repeats, args.naive_max_len, args.memory)
                    del case
    print(format_results(results))
    if args.output:
        save_results(results, Path(args.output), device)
        print(f"saved {args.output}")
    if args.check_targets:
        checks = check_targets(results)
        print(format_checks(checks))
        return 0 if checks and all(c.passed for c in checks) else 1
    return 0


def _shared_prefix_attention(args: argparse.Namespace, device) -> int:
    """`bench attention --shared-prefix`: decodes sharing a prefix, with and without shared-prefix groups."""
    import torch

    from kvflow.bench.attention import SharedPrefixCase, format_results, run_shared_prefix_case, save_results

    results = []
    for batch in args.batch:
        for heads in args.heads:
            num_heads, _, num_kv_heads = heads.partition("/")
            case = SharedPrefixCase(batch, args.group_size, args.shared_prefix, *args.own_tokens, int(num_heads),
                                    int(num_kv_heads or num_heads), args.head_dim, args.block_size,
                                    getattr(torch, args.dtype), device)
            results += run_shared_prefix_case(case, args.repeats)
    print(format_results(results))
    for plain, shared in zip(results[::2], results[1::2]):
        print(f"B={plain.batch} {plain.num_heads}/{plain.num_kv_heads}: {shared.implementation} "
              f"{plain.ms / shared.ms:.2f}x {plain.implementation}")
    if args.output:
        save_results(results, Path(args.output), device)
        print(f"saved {args.output}")
    return 0


def configure(bench: argparse.ArgumentParser) -> None:
    """Add the ``bench`` subcommands to the main CLI's ``bench`` parser."""
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)

    mm = sub.add_parser("make-model", help="make a seeded random-weight reference model (HF format)")
    mm.add_argument("--shape", choices=sorted(SHAPES), required=True)
    mm.add_argument("--out", required=True, help="output directory")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    mm.add_argument("--tokenizer", choices=TOKENIZERS, default="auto",
                    help="sentencepiece: what llama.cpp's GGUF converter accepts (needs the bench extra); "
                         "bpe: kvflow's byte-level BPE; auto: sentencepiece if installed, else bpe")
    mm.add_argument("--max-position-embeddings", type=int, default=None,
                    help="context length of the model (default: the shape's; longer for long-context benchmarks)")
    mm.set_defaults(func=_cmd_make_model)

    lim = sub.add_parser("limits", help="measure GEMM rate and memory read bandwidth")
    lim.add_argument("--gemm-n", type=int, default=2048)
    lim.add_argument("--bw-mib", type=int, default=512)
    lim.add_argument("--repeats", type=int, default=5)
    lim.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    lim.set_defaults(func=_cmd_limits)

    tpp = sub.add_parser("throughput-plot", help="bar chart of throughput reports (output tok/s per backend)")
    tpp.add_argument("reports", nargs="+", help="JSON reports of `kvflow bench throughput`")
    tpp.add_argument("--out", required=True, help="PNG path")
    tpp.add_argument("--title", default=None)
    tpp.set_defaults(func=_cmd_throughput_plot)

    pr = sub.add_parser("profile", help="where kvflow's decode time goes (torch.profiler, per ATen op)")
    pr.add_argument("--model", required=True, help="model directory (HF format)")
    pr.add_argument("--workload", choices=["single", "offline"], default="single")
    pr.add_argument("--num-prompts", type=int, default=64, help="offline batch (single uses 1)")
    pr.add_argument("--input-len", type=int, default=128)
    pr.add_argument("--steps", type=int, default=16, help="decode steps profiled")
    pr.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--top", type=int, default=20, help="ops listed")
    pr.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    pr.add_argument("--output", help="JSON path")
    # Every engine flag (--quantization int8, --no-cpu-kernels, --kv-cache-dtype ...), as the engine commands take them.
    add_engine_config_args(pr)
    pr.set_defaults(func=_cmd_profile)

    at = sub.add_parser("attention", help="attention kernels alone vs torch SDPA and a naive reference")
    at.add_argument("--kind", nargs="+", choices=("prefill", "decode"), default=["prefill", "decode"])
    at.add_argument("--seq-len", nargs="+", type=int, default=[512, 1024, 2048, 4096], help="context lengths")
    at.add_argument("--batch", nargs="+", type=int, default=[1], help="sequences per call")
    at.add_argument("--heads", nargs="+", default=["9/3"], help="query/kv heads, e.g. 32/8 (GQA) or 16/1 (MQA)")
    at.add_argument("--head-dim", type=int, default=64)
    at.add_argument("--block-size", type=int, default=16)
    at.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    at.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    at.add_argument("--impl", nargs="+",
                    default=["kvflow-cpu", "kvflow-cpu-int8", "kvflow-cpu-fp8", "triton", "triton-nosplit", "sdpa",
                             "naive"],
                    help="implementations to time (those the device lacks are listed and skipped)")
    at.add_argument("--quest-budget", type=int, default=1024,
                    help="tokens the -quest implementations read per sequence (--kv-budget of --kv-policy quest)")
    at.add_argument("--repeats", type=int, default=5, help="timed calls per case; the median is reported")
    at.add_argument("--naive-max-len", type=int, default=2048, help="longest context the naive reference runs")
    at.add_argument("--memory", action="store_true",
                    help="CPU: also measure the peak memory each call adds (one fresh process per call)")
    at.add_argument("--output", help="JSON path")
    at.add_argument("--shared-prefix", type=int, metavar="TOKENS",
                    help="instead: decodes in groups sharing TOKENS of prefix-cached KV (whole blocks), timed with "
                         "shared-prefix attention and without (--batch, --heads, --head-dim, --dtype apply)")
    at.add_argument("--group-size", type=int, default=16, help="--shared-prefix: sequences per group")
    at.add_argument("--own-tokens", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"),
                    help="--shared-prefix: each sequence's own tokens after the prefix, spread over a group")
    at.add_argument("--check-targets", action="store_true",
                    help="then check the Triton kernels' goals (accuracy; prefill within 1.3x of SDPA's flash "
                         "backend from 4k tokens; split decode faster than non-split from 8k keys); exit 1 "
                         "if one fails or none applies")
    at.set_defaults(func=_cmd_attention)

    tp = sub.add_parser("throughput", help="offline / single-stream throughput of backends")
    tp.add_argument("--model", required=True, help="model directory (HF format) or a llama-architecture .gguf "
                    "file (llama.cpp then runs the same file)")
    tp.add_argument("--backend", nargs="+", default=["kvflow"],
                    help="kvflow, hf, vllm, llamacpp (one or more; a peer that is not installed is skipped)")
    tp.add_argument(
        "--workload", nargs="+", choices=["offline", "single", "fewshot", "docqa", "noshare"],
        default=["offline", "single"],
        help="offline: --num-prompts x --input-len random tokens, --output-len each; single: one of them; "
        "fewshot: G groups x R requests sharing a P-token prefix, S tokens of their own, outputs 64-512; "
        "docqa: G documents (P/2-2P tokens) x R questions (S/2-2S), outputs 32-256; noshare: fewshot's "
        "lengths, nothing shared. The last three are shuffled, with per-request output lengths; their full "
        "size (fewshot/noshare 64x16, P=1024, S=32; docqa 16x32) takes hours here: see --length-scale",
    )  # fmt: skip
    tp.add_argument("--num-prompts", type=int, default=64, help="offline batch (single uses 1)")
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    tp.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    tp.add_argument("--repeats", type=int, default=1, help="timed runs; the median is reported")
    tp.add_argument("--no-warmup", action="store_true", help="skip the short warm-up generate")
    tp.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    tp.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each timed run, wait up to this long for the CPUs to be >=90%% idle",
    )
    tp.add_argument(
        "--backend-arg",
        action="append",
        default=[],
        metavar="BACKEND:KEY=VALUE",
        help="engine keyword for one backend, e.g. kvflow:max_num_seqs=64 (repeatable)",
    )
    tp.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="BACKEND=INTERPRETER",
        help="interpreter of a peer's worker, e.g. vllm=/tmp/vllmenv/bin/python (repeatable; default "
        "KVFLOW_VLLM_PYTHON / KVFLOW_LLAMACPP_PYTHON, else this one). Peer keywords: "
        "vllm:kv_cache_memory=GIB, llamacpp:gguf=FILE, llamacpp:convert_script=PATH",
    )
    sp = tp.add_argument_group("shared-prefix workloads (fewshot, docqa, noshare); default: each workload's own")
    sp.add_argument("--groups", type=int, help="G: groups / documents (fewshot 64, docqa 16)")
    sp.add_argument("--group-requests", type=int, help="R: requests per group / questions per document (16, 32)")
    sp.add_argument("--shared-tokens", type=int, help="P: shared prefix tokens (docqa: documents in [P/2, 2P]; 1024)")
    sp.add_argument("--suffix-tokens", type=int, help="S: each request's own tokens (docqa: in [S/2, 2S]; 32)")
    sp.add_argument("--output-min", type=int, help="shortest output (fewshot 64, docqa 32)")
    sp.add_argument("--output-max", type=int, help="longest output (fewshot 512, docqa 256)")
    sp.add_argument("--length-scale", type=float, default=1.0,
                    help="multiply the default P, S and output lengths not given (e.g. 0.125 on a 2-core CPU)")
    tp.add_argument("--output", help="JSON path (default bench_results/throughput-MODEL-TIME.json)")
    tp.set_defaults(func=_cmd_throughput)

    kc = sub.add_parser("kv-capacity", help="KV-cache formats at a fixed memory budget: sequences that fit, "
                                             "offline long-context throughput")
    kc.add_argument("--model", required=True, help="model directory (HF format)")
    kc.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    kc.add_argument("--kv-cache-dtype", nargs="+", default=["bfloat16", "int8", "fp8_e4m3"],
                    help="formats, the first being the baseline of the ratios")
    kc.add_argument("--kv-cache-memory", type=float, required=True, help="GiB of KV cache, the same for every format")
    kc.add_argument("--num-prompts", type=int, default=16)
    kc.add_argument("--input-len", type=int, default=4096)
    kc.add_argument("--output-len", type=int, default=64)
    kc.add_argument("--repeats", type=int, default=1, help="rounds over all formats; the median is reported")
    kc.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    kc.add_argument("--block-size", type=int, default=None,
                    help="tokens per KV block (default: the engine's, 16; kivi4/kivi2 use 32 unless this is a "
                         "multiple of 32)")
    kc.add_argument("--max-num-seqs", type=int, default=None,
                    help="every format's max_num_seqs (default: one per prompt; kivi4/kivi2: the most ring slots "
                         "that leave blocks for as many whole sequences)")
    kc.add_argument("--kv-residual-tokens", type=int, default=128, help="kivi4/kivi2: R, newest tokens kept dense")
    kc.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=None,
                    help="every format on the C++ CPU forward or (--no-cpu-kernels) the PyTorch modules "
                         "(default: the engine's choice per format)")
    kc.add_argument("--count-only", action="store_true",
                    help="build each format's engine and report what fits, without running the workload")
    kc.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    kc.add_argument("--output", help="JSON path")
    kc.set_defaults(func=_cmd_kv_capacity)

    sd = sub.add_parser("spec-decode", help="speculative decoding: tokens/s with and without it, acceptance, "
                                            "mean accepted length; or (--verify-cost) one verification step's cost")
    sd.add_argument("--model", help="model directory (default: the shipped tiny)")
    sd.add_argument("--dtype", choices=_DTYPES, help="default float32 (bfloat16 with --verify-cost)")
    sd.add_argument("--workload", choices=["code", "edit"], default="code",
                    help="code: complete functions of held-out stdlib modules; edit: rewrite a function the "
                         "prompt contains (the output copies the prompt)")
    sd.add_argument("--method", nargs="+", choices=["none", "ngram", "draft"], default=["none", "ngram"],
                    help="configurations; the ratios and the greedy-output check are against none")
    sd.add_argument("--speculative-model", help="draft model for --method draft (default: the shipped tiny-draft)")
    sd.add_argument("--num-speculative-tokens", nargs="+", type=int, default=[2, 4, 6], metavar="K",
                    help="proposals per step, one configuration per K and method")
    sd.add_argument("--prompt-lookup-min", type=int, default=1)
    sd.add_argument("--prompt-lookup-max", type=int, default=4)
    sd.add_argument("--batch", nargs="+", type=int, default=[1], help="sequences at once (e.g. 1 4 16 64)")
    sd.add_argument("--num-prompts", type=int, default=8,
                    help="prompts per run, in groups of --batch (at least one group): batch 1 runs them one by one")
    sd.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per sequence (EOS ignored)")
    sd.add_argument("--prompt-len", type=int, default=256, help="most tokens per prompt")
    sd.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    sd.add_argument("--verify-cost", action="store_true",
                    help="instead: time a step verifying K proposals per sequence against a decode step "
                         "(random prompts; e.g. on `kvflow bench make-model --shape 500m`)")
    sd.add_argument("--context-len", type=int, default=512, help="--verify-cost: prompt tokens per sequence")
    sd.add_argument("--steps", type=int, default=10, help="--verify-cost: steps timed per K and repeat")
    sd.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    sd.add_argument("--out", help="JSON path")
    sd.set_defaults(func=_cmd_spec_decode)

    sc = sub.add_parser("specontext", help="SpeContext: decode throughput of long outputs over long contexts "
                                           "against full attention, Quest at the same budget and HF generate")
    sc.add_argument("--model", help="model directory (default: the shipped tiny, or --shape's)")
    sc.add_argument("--shape", choices=sorted(SHAPES),
                    help="without --model: a seeded random-weight model of this shape (its context stretched to "
                         "--prompt-len + --max-tokens), written to a temp dir; its retrieval head is random too")
    sc.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: every engine and HF generate on the GPU, attention by the Triton backend (checked)")
    sc.add_argument("--dtype", choices=_DTYPES, help="default float32")
    sc.add_argument("--retrieval-model", help="retrieval head (default: the shipped one for tiny; a random-weight "
                                              "head of the model's layout otherwise, for costs only)")
    sc.add_argument("--method", nargs="+", choices=["full", "quest", "specontext"],
                    default=["full", "quest", "specontext"])
    sc.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    sc.add_argument("--prompt-len", type=int, default=2048)
    sc.add_argument("--max-tokens", type=int, default=2048, help="greedy tokens per sequence (EOS ignored)")
    sc.add_argument("--budget", type=int, default=256, help="kv_budget of quest and specontext (tokens read per step)")
    sc.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians are reported")
    sc.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    sc.add_argument("--resident-memory", type=float, metavar="GIB",
                    help="the edge setting instead: one long generation with the KV memory capped at GIB — full "
                         "attention in a cache of that size, SpeContext with --kv-resident-memory GIB (older KV in "
                         "a file), and both uncapped (--method, --batch and HF do not apply)")
    sc.add_argument("--spill-dir", help="with --resident-memory: the offload tier's directory (default: temp)")
    sc.add_argument("--block-size", type=int, help="with --resident-memory: tokens per KV block of every engine "
                                                   "(default 16; 32 makes 135m's bf16 blocks whole pages)")
    sc.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    sc.add_argument("--out", help="JSON path")
    sc.set_defaults(func=_cmd_specontext)

    lo = sub.add_parser("lora", help="multi-LoRA: a batch spread over N adapters against the base model alone "
                                     "(output tokens/s, each configuration its own engine)")
    lo.add_argument("--model", help="model directory (default: the shipped tiny, or --shape's)")
    lo.add_argument("--shape", choices=sorted(SHAPES),
                    help="without --model: a seeded random-weight model of this shape, written to a temp dir")
    lo.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: every engine on the GPU, LoRA by the Triton kernels (checked)")
    lo.add_argument("--dtype", choices=_DTYPES, help="default bfloat16")
    lo.add_argument("--batch", type=int, default=32, help="requests in the batch")
    lo.add_argument("--adapters", type=int, default=8, help="adapters the batch is spread over (all resident)")
    lo.add_argument("--rank", type=int, default=16, help="rank of every adapted projection")
    lo.add_argument("--prompt-len", type=int, default=128)
    lo.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per request (EOS ignored)")
    lo.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    lo.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    lo.add_argument("--out", help="JSON path")
    lo.set_defaults(func=_cmd_lora)

    zo = sub.add_parser("zoo", help="BlockLLM's block zoo: N variants in one engine against N engines (memory, "
                                    "throughput, p95 latency at a fixed request mix)")
    zo.add_argument("--model", help="base model directory (default: the shipped tiny)")
    zo.add_argument("--dtype", choices=_DTYPES, help="default bfloat16")
    zo.add_argument("--variants", nargs="+", type=int, default=[2, 4, 8], metavar="N")
    zo.add_argument("--changed-layers", type=int, default=1, help="top decoder layers each variant changes")
    zo.add_argument("--requests", type=int, default=4, help="requests per variant")
    zo.add_argument("--prompt-len", type=int, default=64)
    zo.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per request (EOS ignored)")
    zo.add_argument("--system-prompt-len", type=int, default=0,
                    help="tokens every prompt starts with, computed before the batch; adds the zoo without KV "
                         "sharing (zoo-private-kv) to compare the KV held")
    zo.add_argument("--cores", type=int, help="cores shared by the processes (default: all)")
    zo.add_argument("--out", help="JSON path")
    zo.set_defaults(func=_cmd_zoo)

    lc = sub.add_parser("longconv", help="long-conv models: prefill by torch FFT, FlashButterfly and direct "
                                         "against attention, decode tokens/s vs context, state bytes per token")
    lc.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    lc.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 32768], help="prefill tokens")
    lc.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192, 32768], help="decode contexts")
    lc.add_argument("--direct-max", type=int, default=2048, help="longest prefill the O(N^2) direct sum runs")
    lc.add_argument("--attention-max", type=int, default=8192, help="longest prefill SDPA runs")
    lc.add_argument("--max-factor", type=int, default=64, help="FlashButterfly's largest DFT matrix")
    lc.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="decode weights and cache")
    lc.add_argument("--repeats", type=int, default=3)
    lc.add_argument("--no-decode", action="store_true")
    lc.add_argument("--engine-lengths", nargs="*", type=int, default=[],
                    help="also time the first token of one prompt of each length through the whole engine")
    lc.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    lc.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the prefill part on the GPU, with the Triton FlashButterfly (decode skipped)")
    lc.add_argument("--conv-dtype", choices=_DTYPES, default="float32",
                    help="u and the kernel of the timed convolutions (each method computes in fp32)")
    lc.add_argument("--out", help="JSON path")
    lc.set_defaults(func=_cmd_longconv)

    ko = sub.add_parser("kv-offload", help="KV offload tiers: TTFT of loading a prefix vs recomputing it per "
                                           "tier and prefix length (the break-even), and after a restart")
    ko.add_argument("--model", required=True, help="model directory (e.g. `kvflow bench make-model --shape 135m`)")
    ko.add_argument("--lengths", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512, 1024, 2048],
                    help="prefix lengths in tokens")
    ko.add_argument("--tiers", nargs="+", default=["file-direct", "file-cached", "file-cold", "host"],
                    help="file-direct (O_DIRECT), file-cached (buffered, in the page cache), file-cold (buffered, "
                         "dropped from the page cache) and host (the host-memory tier)")
    ko.add_argument("--repeats", type=int, default=3, help="prompts per length; medians are reported")
    ko.add_argument("--dtype", choices=_DTYPES, help="default: the model's")
    ko.add_argument("--block-size", type=int, default=16)
    ko.add_argument("--restart-prompts", type=int, default=8, help="prompts timed after a restart (0: skip)")
    ko.add_argument("--restart-len", type=int, default=2048, help="tokens per restart prompt")
    ko.add_argument("--offload-dir", help="where the file tier's temporary folders go (default: the system's)")
    ko.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ko.add_argument("--out-dir", default="bench_results/kv_offload", help="JSON result and plot")
    ko.add_argument("--no-save", action="store_true")
    ko.set_defaults(func=_cmd_kv_offload)

    ed = sub.add_parser("edge", help="a model under a small box's limits (cores by affinity, memory by a cgroup "
                                     "or an RSS watchdog): tokens/s, TTFT, CPU%%/RAM%% of the limit, peak RSS, "
                                     "energy; kvflow and llama.cpp under the same limits (docs/edge.md)")
    ed.add_argument("--model", nargs="+", default=["tiny"],
                    help="tiny (the shipped model), NAME=DIR or DIR (e.g. `kvflow bench make-model --shape 135m`)")
    ed.add_argument("--formats", nargs="+", default=["bf16"], choices=("bf16", "q8_0", "q4_0"),
                    help="weight formats; both engines read the same GGUF file")
    ed.add_argument("--limits", nargs="+", default=["1x1"], help="CORESxGIB limits, e.g. 1x2 2x4")
    ed.add_argument("--engines", nargs="+", default=["kvflow", "llamacpp"], choices=("kvflow", "llamacpp"))
    ed.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    ed.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    ed.add_argument("--repeats", type=int, default=2, help="timed requests per run; medians are reported")
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--memory-limiter", choices=("auto", "cgroup", "watchdog"), default="auto",
                    help="auto: a memory cgroup where one can be made, else the RSS watchdog")
    ed.add_argument("--kv-cache-memory", type=float, default=None,
                    help="kvflow's KV cache in GiB (default: 1/8 of the memory limit, at most 0.25)")
    ed.add_argument("--watts-per-core", type=float, default=3.75,
                    help="W per busy core for the energy estimate where RAPL is not readable")
    ed.add_argument("--python", help="llama.cpp's interpreter (default KVFLOW_LLAMACPP_PYTHON, else this one)")
    ed.add_argument("--kvflow-isa", choices=("native", "avx2", "generic"), default=None,
                    help="ISA of kvflow's C++ kernels in the runs (KVFLOW_CPU_ISA; avx2: the x86 container image's "
                         "build, generic: an edge box without AVX-512; default: as the environment sets it)")
    ed.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="each run waits up to S seconds for idle CPUs before its timed section (shared machines)")
    ed.add_argument("--kvflow-quant-activations", choices=("exact", "q8"), default="exact",
                    help="kvflow's arithmetic on q8_0/q4_0 weights: exact (float activations) or q8 (int8 blocks "
                         "of 32, as llama.cpp multiplies them)")
    ed.add_argument("--out-dir", default="bench_results/edge", help="edge.json and edge.png")
    ed.add_argument("--no-save", action="store_true")
    ed.set_defaults(func=_cmd_edge)

    sk = sub.add_parser("soak", help="reliability soak of a live server: a seeded mix of requests, abandoned streams, "
                                     "client timeouts and malformed bodies; no 5xx, no leaked KV, bounded memory")
    sk.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    sk.add_argument("--num-requests", type=int, default=1000)
    sk.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    sk.add_argument("--duration", type=float, default=0.0,
                    help="spread the requests over this many seconds (seeded Poisson arrivals); 0: back to back")
    sk.add_argument("--seed", type=int, default=0)
    sk.add_argument("--model", help="model id to send (default: the server's first)")
    sk.add_argument("--api-key", default=os.environ.get("KVFLOW_API_KEY"), help="default: $KVFLOW_API_KEY")
    sk.add_argument("--max-tokens", type=int, default=32, help="most tokens a well-formed request asks for")
    sk.add_argument("--pid", type=int, action="append",
                    help="server process whose memory (with its children's) is sampled; repeatable")
    sk.add_argument("--max-memory-growth", type=float, default=64.0,
                    help="MiB a process may grow over the run's second half before the soak fails")
    sk.add_argument("--out", default="bench_results/soak.json", help="JSON result")
    sk.set_defaults(func=_cmd_soak)

    qg = sub.add_parser("quant-gemv", help="quantised-weight CPU kernels (q8_0, q4_0, q4_k, int8, bipolar) against "
                                           "the bf16 GEMVs, on each matrix of one layer: µs per call and GB/s")
    qg.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    qg.add_argument("--rows", type=int, default=1, help="activation rows (above 8: the prefill GEMM)")
    qg.add_argument("--formats", nargs="+", choices=list(QUANT_GEMV_FORMATS), default=list(QUANT_GEMV_DEFAULT),
                    help="bipolarN: N-bit bipolar weights in groups of 64 (the bit-plane GEMV); bipolarN-aA: with "
                    "activations rounded to A bits (popcounts)", metavar="FORMAT")
    qg.add_argument("--seconds", type=float, default=0.3, help="timing per method and matrix")
    qg.add_argument("--stream-mib", type=int, default=96,
                    help="bf16 MiB of weight copies each method cycles through (above the last-level cache)")
    qg.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    qg.add_argument("--kernels", nargs="+", choices=["auto", "avx512", "avx2", "scalar", "planes", "decoded", "popcnt"],
                    default=["auto"], help="the decode GEMV's kernels to time side by side (avx2: q8_0, q4_0 and "
                    "q4_k; planes, decoded: bipolar's AVX-512 decomposition and its planes decoded into weights; "
                    "popcnt: A-bit bipolar's AVX512-VPOPCNTDQ kernel)")
    qg.set_defaults(func=_cmd_quant_gemv)

    bp = sub.add_parser("bitplane", help="the Triton bit-plane kernels (bipolar weights) against torch's bf16 "
                                         "matmul on each matrix of one layer: µs, GB/s, error")
    bp.add_argument("--shape", choices=sorted(SHAPES), default="500m")
    bp.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="bipolar weight widths")
    bp.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256], help="activation rows M")
    bp.add_argument("--group", type=int, default=64, help="bipolar group size")
    bp.add_argument("--impl", nargs="+", choices=BITPLANE_IMPLS, default=list(BITPLANE_IMPLS))
    bp.add_argument("--device", help="default: cuda when available")
    bp.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="activations and the dense weight")
    bp.add_argument("--repeats", type=int, default=20, help="timed passes over the weight copies")
    bp.add_argument("--stream-mib", type=float, default=256,
                    help="MiB of bf16 weight copies each method cycles through (above the GPU's L2)")
    bp.add_argument("--output", help="JSON file for the results")
    bp.set_defaults(func=_cmd_bitplane)

    gg = sub.add_parser("to-gguf", help="convert a model directory to GGUF for llama.cpp")
    gg.add_argument("--model", required=True, help="model directory (HF format)")
    gg.add_argument("--out", help="GGUF file (default: beside the directory, e.g. 135m.bf16.gguf)")
    gg.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    gg.add_argument("--convert-script", help="llama.cpp's convert_hf_to_gguf.py (default: found under /tmp/lcpp)")
    gg.add_argument("--python", help="interpreter with gguf, sentencepiece, torch, transformers "
                                     "(default KVFLOW_LLAMACPP_PYTHON, else this one)")
    gg.set_defaults(func=_cmd_to_gguf)

    from kvflow.cli.bench_serve import add_subcommands as add_serve_subcommands

    add_serve_subcommands(sub)
