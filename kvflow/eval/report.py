"""Writing an `EvalResult`: results.json, one JSON and one heat map per retrieval task, a text table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvflow.eval.heatmap import save_heatmap
from kvflow.eval.runner import EvalResult


def engine_summary(engine: dict[str, Any]) -> str:
    cache, sched = engine.get("cache", {}), engine.get("scheduler", {})
    kv = cache.get("kv_cache_memory")
    parts = [
        f"dtype={engine.get('dtype')}", f"max_model_len={engine.get('max_model_len')}",
        f"kv_cache_dtype={cache.get('kv_cache_dtype', 'auto')}", f"kv={'auto' if kv is None else f'{kv}GiB'}",
        f"blocks={engine.get('num_kv_blocks')}",
        f"block_size={cache.get('block_size')}", f"prefix_caching={cache.get('enable_prefix_caching')}",
        f"max_num_seqs={sched.get('max_num_seqs')}",
    ]
    if cache.get("kv_policy", "none") != "none":
        parts.insert(3, f"kv_policy={cache['kv_policy']} kv_budget={cache.get('kv_budget')} "
                        f"kv_sink_tokens={cache.get('kv_sink_tokens')} kv_window={cache.get('kv_window')}")
    return " ".join(parts)


#: Said wherever perplexity stands next to a KV policy's retrieval numbers, so nobody reads "no loss".
PPL_PREFILL_NOTE = ("note: perplexity is computed in prefill, so it does not show the loss of decode-time KV "
                    "policies (h2o, snapkv, quest, specontext; streaming acts only between prefill chunks)")


def policy_summary(result: EvalResult) -> str | None:
    """One line on the KV policy in effect (None: the engine keeps all KV)."""
    policy = result.engine.get("cache", {}).get("kv_policy", "none")
    if policy == "none":
        return None
    kb = result.kv_budget
    if kb is None:
        return f"kv policy: {policy}, kv_budget {result.engine['cache'].get('kv_budget')} tokens per request"
    kept = ", ".join(f"{task} {100 * share:.1f}%" for task, share in kb["kept_share"].items() if share is not None)
    return (f"kv policy: {policy}, each request's kv_budget = max({kb['floor']}, round({kb['fraction']:g} x prompt "
            f"tokens)); prompt tokens within budget: {kept}")


def _short_engine(engine: dict[str, Any], fraction: float | None = None) -> str:
    cache = engine.get("cache", {})
    kv = cache.get("kv_cache_memory")
    budget = "auto" if kv is None else f"{kv} GiB"
    policy = cache.get("kv_policy", "none")
    if policy != "none":
        policy += f" @ {fraction:g} of each prompt" if fraction else f" ({cache.get('kv_budget')} tokens)"
    return (f"{engine.get('dtype')}, KV {cache.get('kv_cache_dtype', 'auto')} {budget} "
            f"({engine.get('num_kv_blocks')} blocks), "
            + ("" if policy == "none" else f"policy {policy}, ")
            + f"prefix caching {'on' if cache.get('enable_prefix_caching') else 'off'}")


def save_results(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """results.json (everything), passkey.json/.png and multikey.json/.png; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    data = result.to_dict()
    paths["results"] = _write_json(out / "results.json", data)
    name = Path(result.model).name or result.model
    subtitle = f"{name} | {_short_engine(result.engine, result.config.get('kv_budget_fraction'))}"
    if result.passkey is not None:
        pk = result.passkey
        paths["passkey_json"] = _write_json(out / "passkey.json", {"model": result.model, "engine": result.engine,
                                                                   **pk})
        paths["passkey_png"] = save_heatmap(
            out / "passkey.png", pk["accuracy"], [f"{d:g}" for d in pk["depths"]], _length_labels(pk),
            f"passkey retrieval accuracy ({pk['trials']} trials/cell)\n{subtitle}",
            "context length (tokens)", "needle depth")
    if result.multikey is not None:
        mk = result.multikey
        paths["multikey_json"] = _write_json(out / "multikey.json", {"model": result.model, "engine": result.engine,
                                                                     **mk})
        paths["multikey_png"] = save_heatmap(
            out / "multikey.png", mk["accuracy"], [str(p) for p in mk["pairs"]], _length_labels(mk),
            f"multi-key recall accuracy ({mk['trials']} contexts x {mk['queries']} queries/cell)\n{subtitle}",
            "context length (tokens)", "key-value pairs")
    return paths


def _length_labels(grid: dict[str, Any]) -> list[str]:
    return [str(n) if n == used else f"{n} ({used})" for n, used in zip(grid["lengths"], grid["effective_lengths"])]


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _grid_table(grid: dict[str, Any], row_key: str, row_fmt) -> list[str]:
    labels = _length_labels(grid)
    width = max(6, *(len(s) for s in labels))
    lines = [f"  {row_key:>8} " + " ".join(f"{s:>{width}}" for s in labels)]
    for label, row in zip(grid[row_key], grid["accuracy"]):
        lines.append(f"  {row_fmt(label):>8} " + " ".join(f"{_fmt(v):>{width}}" for v in row))
    return lines


def format_report(result: EvalResult) -> str:
    """A concise text summary: perplexity vs unigram, and the two accuracy grids."""
    lines = [f"model: {result.model}", f"engine: {engine_summary(result.engine)}"]
    c = result.corpus
    lines.append(f"corpus: CPython, {c['heldout_documents']} held-out documents ({c['heldout_tokens']:,} tokens; "
                 f"split {c['heldout_percent']}% from {c['split_source']})")
    policy = policy_summary(result)
    if policy is not None:
        lines.append(policy)
    p = result.perplexity
    if p is not None:
        lines.append(f"perplexity: {p['perplexity']:.3f}  ({_fmt(p['bits_per_byte'], '.3f')} bits/byte; "
                     f"{p['num_tokens']:,} tokens, {p['num_windows']} windows of <= {p['context']} tokens, "
                     f"{_fmt(p['tokens_per_second'], ',.0f')} tok/s)")
        if "unigram" in p:
            u = p["unigram"]
            lines.append(f"unigram baseline: {u['perplexity']:.3f}  ({_fmt(u['bits_per_byte'], '.3f')} bits/byte; "
                         f"train split {u['train_tokens']:,} tokens)  -> model/unigram = "
                         f"{p['perplexity_ratio_to_unigram']:.3f}")
        if policy is not None:
            lines.append(PPL_PREFILL_NOTE)
    if result.passkey is not None:
        pk = result.passkey
        lines.append(f"passkey accuracy (rows: needle depth, columns: context length; {pk['trials']} trials/cell): "
                     f"mean {_fmt(pk['mean_accuracy'])}, min {_fmt(pk['min_accuracy'])}")
        lines += _grid_table(pk, "depths", lambda d: f"{d:g}")
        if pk["skipped"]:
            lines.append(f"  ('-': {len(pk['skipped'])} cells too short for the needle and question)")
    if result.multikey is not None:
        mk = result.multikey
        lines.append(f"multi-key recall accuracy (rows: pairs, columns: context length; "
                     f"{mk['trials']} contexts x {mk['queries']} queries/cell): mean {_fmt(mk['mean_accuracy'])}")
        lines += _grid_table(mk, "pairs", str)
        if mk["skipped"]:
            lines.append(f"  ('-': {len(mk['skipped'])} cells whose facts do not fit the context)")
    if any(n != u for grid in (result.passkey, result.multikey) if grid
           for n, u in zip(grid["lengths"], grid["effective_lengths"])):
        lines.append("  'N (M)': length N clipped to M tokens so the answer fits the model's context")
    if result.draft is not None:
        d = result.draft
        lines.append(f"draft {d['draft_model']}: greedy next-token agreement {d['agreement']:.3f} over "
                     f"{d['positions']:,} positions (top-1 accuracy: teacher {d['teacher_top1_accuracy']:.3f}, "
                     f"draft {d['draft_top1_accuracy']:.3f}); parameters {d['draft_parameters']:,} vs "
                     f"{d['teacher_parameters']:,}; decode {d['decode_ms_per_token']['draft']:.1f} vs "
                     f"{d['decode_ms_per_token']['teacher']:.1f} ms/token")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return "\n".join(lines)
