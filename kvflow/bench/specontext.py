"""``kvflow bench specontext``: long outputs over a long context — decode throughput of SpeContext
against full attention and Quest at the same budget, and against Hugging Face `generate`.

The workload is the paper's shape: every sequence has a `prompt_len`-token prompt (held-out CPython
text, the same on every run) and generates exactly `max_tokens` tokens (greedy, EOS ignored; no
prefix cache), `batch` sequences at once. Each method gets its own engine; every repeat runs every
method once, in an order rotated between repeats, so ratios compare runs made moments apart on
this shared machine, and figures are medians. Decode throughput is output tokens over the time
after the first token (TTFT, prompt processing, is reported apart: every method computes the
prompt in full).

SpeContext's own counters give the step-to-step overlap (the share of each selection already in
the buffer) and the bytes moved per sparse step. A model without a retrieval head of its own (a
random-weight `kvflow bench make-model` shape) gets a random-weight head of the right layout: its
selection means nothing for quality, only the costs are measured, and the report says so.

With ``device="cuda"`` every engine runs on the GPU, attention by the Triton backend (flash-decoding
over the paged cache; Quest and SpeContext read their block subsets with the same decode kernel),
and HF `generate` too. The bench checks that (the model's parameters, the retrieval head's, on
CUDA; the runner's backend "triton") rather than report a silent fallback, warms each engine up on
the timed batch itself (full prompts, a few tokens: Triton compiles for those shapes before the
clock starts), and synchronizes the device around every timed section.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("full", "quest", "specontext")


def long_prompts(tokenizer: Any, model: str, batch: int, prompt_len: int) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_len` tokens: held-out standard-library text (the model's
    training split), each from its own module in turn, wrapping around the text when short."""
    from kvflow.bench.spec_decode import heldout_python

    texts = heldout_python(model)
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(stream) < prompt_len:
        raise ValueError(f"the held-out text has {len(stream)} tokens, fewer than --prompt-len {prompt_len}")
    step = max(1, (len(stream) - prompt_len) // max(1, batch))
    return [stream[i * step : i * step + prompt_len] for i in range(batch)]


def retrieval_head_for(model: str, retrieval_model: str | None, workdir: Path) -> tuple[str, bool]:
    """(the retrieval head directory, whether it is trained): `retrieval_model`, the shipped one for
    the shipped model, else a seeded random-weight head of the model's layout (costs only)."""
    import torch

    from kvflow.assets import default_model_path, default_retrieval_path
    from kvflow.config import EngineConfig
    from kvflow.model.retrieval_head import RetrievalHead, RetrievalHeadConfig, save_retrieval_head

    if retrieval_model:
        return retrieval_model, True
    if Path(model).resolve() == default_model_path().resolve():
        return str(default_retrieval_path()), True
    cfg = EngineConfig.create(model).model
    shipped = RetrievalHeadConfig.from_dir(default_retrieval_path())
    torch.manual_seed(0)
    head = RetrievalHead(RetrievalHeadConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_kv_heads=cfg.num_kv_heads,
        embed_dim=shipped.embed_dim,
        window=shipped.window, query_heads_per_kv=shipped.query_heads_per_kv, head_dim=shipped.head_dim,
        rope_theta=cfg.rope.theta, max_position_embeddings=cfg.max_model_len, target="random (costs only)"))
    path = workdir / "random-retrieval-head"
    save_retrieval_head(head, path)
    return str(path), False


def _engine_args(method: str, budget: int, retrieval: str) -> dict[str, Any]:
    if method == "full":
        return {}
    if method == "quest":
        return {"kv_policy": "quest", "kv_budget": budget}
    if method == "specontext":
        return {"kv_policy": "specontext", "kv_budget": budget, "retrieval_model": retrieval}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA), so a clock read after it covers that work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def check_on_device(llm: Any, device: str) -> str:
    """Raise unless the engine's model (and retrieval head) live on `device` and, on CUDA, attention runs
    on the Triton backend; return what runs attention (the backend's name, or "C++ forward")."""
    import torch

    runner = llm.engine.core.runner
    kind = torch.device(device).type
    modules = [runner.model] + ([runner.retrieval_head] if runner.retrieval_head is not None else [])
    wrong = {str(p.device) for m in modules for p in m.parameters() if p.device.type != kind}
    if wrong:
        raise RuntimeError(f"the engine was asked for {device} but parameters are on {sorted(wrong)}")
    if kind == "cuda" and (runner.backend.name != "triton" or runner.cpu_forward is not None):
        raise RuntimeError(f"the engine on {device} runs the {runner.backend.name} attention backend, not Triton "
                           "(is triton importable?): the figures would not be the Triton decode's")
    # On CPU the C++ forward, where it runs, does the attention itself.
    return "C++ forward" if runner.cpu_forward is not None else str(runner.backend.name)


def _timed(llm: Any, prompts: list[list[int]], max_tokens: int, device: str = "cpu") -> dict[str, Any]:
    from kvflow.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    core = llm.engine.core
    before = core.stats()
    first: dict[str, float] = {}
    synchronize(device)
    start = time.perf_counter()
    request_ids = [f"sc-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(request_ids, prompts):
        llm.engine.add_request(rid, {"prompt_token_ids": p}, params)
    outputs: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    decoding: tuple[float, int] | None = None  # (when every sequence had its first token, tokens by then)
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            now = time.perf_counter()
            counts[out.request_id] = len(out.outputs[0].token_ids) if out.outputs else 0
            if counts[out.request_id]:
                first.setdefault(out.request_id, now)
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        if decoding is None and len(first) == len(prompts):
            decoding = (time.perf_counter(), sum(counts.values()))
    synchronize(device)
    end = time.perf_counter()
    after = core.stats()
    ttft = max(first.values()) - start
    tokens = sum(len(outputs[r]) for r in request_ids)
    assert decoding is not None
    sparse = after.specontext_steps - before.specontext_steps
    moved = after.specontext_moved_tokens - before.specontext_moved_tokens
    kept = after.specontext_kept_tokens - before.specontext_kept_tokens
    return {
        "seconds": end - start, "ttft_s": ttft, "output_tokens": tokens,
        # Tokens generated once every sequence decodes, over that time (the batch decoding together).
        "decode_tok_s": (tokens - decoding[1]) / max(1e-9, end - decoding[0]),
        "tok_s": tokens / (end - start),
        "specontext_sparse_steps": sparse,
        "specontext_overlap": kept / (kept + moved) if kept + moved else None,
        "specontext_moved_bytes_per_step": (after.specontext_moved_bytes - before.specontext_moved_bytes) / sparse
        if sparse else None,
        "tokens": [outputs[r] for r in request_ids],
    }


def hf_generate(model: str, prompts: list[list[int]], max_tokens: int, dtype: str,
                device: str = "cpu") -> dict[str, Any]:
    """Hugging Face `generate` (SDPA attention, its KV cache), greedy, the batch padded on the left; on
    CUDA after an untimed short generate (kernels, cuBLAS handles), synchronized around the timed one."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa").eval()
    hf = hf.to(device)
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    with torch.no_grad():
        if torch.device(device).type == "cuda":
            hf.generate(ids[:, :64], attention_mask=torch.ones_like(ids[:, :64]), max_new_tokens=4,
                        min_new_tokens=4, do_sample=False, pad_token_id=0)
        synchronize(device)
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        synchronize(device)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del hf
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": seconds, "output_tokens": tokens, "tok_s": tokens / seconds}


def run_specontext_bench(model: str, dtype: str, batches: tuple[int, ...], prompt_len: int, max_tokens: int,
                         budget: int, methods: tuple[str, ...] = METHODS, repeats: int = 1,
                         retrieval_model: str | None = None, hf: bool = True,
                         log: Any = print, device: str = "cpu",
                         checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every method on `batches`; `checkpoint(results)` after each batch (a partial report survives a
    run cut short)."""
    import torch

    import kvflow
    from kvflow.model.loader import load_tokenizer

    tokenizer = load_tokenizer(model)
    results: dict[str, Any] = {"model": model, "device": device, "dtype": dtype, "prompt_len": prompt_len,
                               "max_tokens": max_tokens, "budget": budget, "repeats": repeats, "runs": []}
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        results["gpu"] = torch.cuda.get_device_name(torch.device(device))
    with tempfile.TemporaryDirectory() as tmp:
        retrieval, trained = retrieval_head_for(model, retrieval_model, Path(tmp))
        results["retrieval_model"] = retrieval if trained else "random weights (costs only)"
        for batch in batches:
            prompts = long_prompts(tokenizer, model, batch, prompt_len)
            blocks = batch * (-(-(prompt_len + max_tokens) // 16) + 2 * (budget // 16)) + 16
            engines = {m: kvflow.LLM(model=model, dtype=dtype, num_blocks=blocks, enable_prefix_caching=False,
                                     max_num_seqs=max(batch, 1), device=device, **_engine_args(m, budget, retrieval))
                       for m in methods}
            results["attention_backend"] = {m: check_on_device(llm, device) for m, llm in engines.items()}
            for m, llm in engines.items():  # warm up: kernels, thread pools; Triton compiles for the timed shapes
                if results["attention_backend"][m] == "triton":
                    _timed(llm, prompts, 8, device)
                else:
                    _timed(llm, [prompts[0][:64]], 4, device)
            per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            for r in range(repeats):
                order = list(methods[r % len(methods):]) + list(methods[: r % len(methods)])
                for m in order:
                    run = _timed(engines[m], prompts, max_tokens, device)
                    per_method[m].append(run)
                    log(f"batch {batch} {m}: {run['decode_tok_s']:.1f} decode tok/s, TTFT {run['ttft_s']:.2f} s")
            full = per_method.get("full")
            for m, runs in per_method.items():
                row = {"batch": batch, "method": m}
                for key in ("decode_tok_s", "tok_s", "ttft_s", "seconds", "specontext_overlap",
                            "specontext_moved_bytes_per_step"):
                    values = [x[key] for x in runs if x[key] is not None]
                    row[key] = statistics.median(values) if values else None
                if full:
                    row["vs_full"] = row["decode_tok_s"] / statistics.median(x["decode_tok_s"] for x in full)
                    row["same_tokens_as_full"] = runs[0]["tokens"] == full[0]["tokens"]
                results["runs"].append(row)
            for llm in engines.values():
                llm.close()
            del engines, llm
            if on_cuda:
                torch.cuda.empty_cache()
            if hf:
                run = hf_generate(model, prompts, max_tokens, dtype, device)
                log(f"batch {batch} hf generate: {run['tok_s']:.1f} tok/s")
                results["runs"].append({"batch": batch, "method": "hf-generate", **run})
            if checkpoint is not None:
                checkpoint(results)
    return results


def format_report(results: dict[str, Any]) -> str:
    where = results.get("device", "cpu") + (f": {results['gpu']}" if "gpu" in results else "")
    backends = sorted(set(results.get("attention_backend", {}).values()))
    lines = [f"{results['model']} ({results['dtype']}, {where}"
             + (f", {'/'.join(backends)} attention" if backends else "") + f"): {results['prompt_len']}-token prompts, "
             f"{results['max_tokens']} tokens generated each, budget {results['budget']} tokens; retrieval head: "
             f"{results['retrieval_model']}",
             f"{'batch':>5} {'method':<12} {'decode tok/s':>12} {'vs full':>8} {'TTFT s':>7} {'overlap':>8} "
             f"{'moved/step':>11}"]
    hf = {r["batch"]: r["tok_s"] for r in results["runs"] if r["method"] == "hf-generate"}
    for r in results["runs"]:
        if r["method"] == "hf-generate":
            lines.append(f"{r['batch']:>5} {'hf-generate':<12} {r['tok_s']:>12.1f} {'':>8} (tokens/s over the whole "
                         "generate, prompt included)")
            continue
        overlap = "" if r["specontext_overlap"] is None else f"{r['specontext_overlap']:.3f}"
        moved = "" if r["specontext_moved_bytes_per_step"] is None else \
            f"{r['specontext_moved_bytes_per_step'] / 1024:.0f} KiB"
        vs = f"{r.get('vs_full', 0):.2f}x" if "vs_full" in r else ""
        lines.append(f"{r['batch']:>5} {r['method']:<12} {r['decode_tok_s']:>12.1f} {vs:>8} {r['ttft_s']:>7.2f} "
                     f"{overlap:>8} {moved:>11}")
    for batch, tok_s in hf.items():
        ours = {r["method"]: r["tok_s"] for r in results["runs"]
                if r["batch"] == batch and r["method"] != "hf-generate"}
        lines.append(f"batch {batch}, tokens/s over the whole run vs hf generate: "
                     + ", ".join(f"{m} {v / tok_s:.2f}x" for m, v in ours.items()))
    return "\n".join(lines)


def save_report(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
