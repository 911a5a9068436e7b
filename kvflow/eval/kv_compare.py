"""Accuracy against KV bytes: the same evaluation under several KV methods, one table and one figure
(`kvflow eval --compare-kv auto,int8,snapkv@0.25,int8+snapkv@0.25 ...`).

A method is a KV-cache format, a KV policy at a budget fraction, or both (kv_methods.py). Each
method's full results go to <out>/<folder>/ as a plain `kvflow eval` writes them; a method whose
results.json there was made with the same evaluation settings, format, policy, fraction, sinks and
window is reused (`reuse=True`), so adding a method to the figure costs one run. The x axis is the
KV bytes per token relative to the model's own dtype: the format's bytes (all layers, keys and
values, scales included, from the KV-cache spec) times the share of tokens kept (streaming, h2o,
snapkv). Quest keeps every token (plus each block's key bounds) and reads only its share per decode
step, so it sits at the share *read*, drawn hollow: it saves reads, not memory. KIVI (kivi4, kivi2)
sits at its blocks' bytes (codes, scales and zero points); each running sequence also holds its
newest R + 32 tokens in the model's dtype in a ring, a fixed cost per sequence that the rows report
per context length (`kv_kept_ratio_by_length`: the blocks plus the ring, shared over n tokens), and
its engine pages in blocks of 32 tokens (`KVMethod.block_size`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvflow.attention.kivi import KIVI_DEFAULT_RESIDUAL, KIVI_FORMATS, KIVI_GROUP
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.eval.kv_figure import save_comparison
from kvflow.eval.kv_methods import KVMethod
from kvflow.eval.report import PPL_PREFILL_NOTE, save_results
from kvflow.eval.runner import EvalConfig, run_eval

__all__ = ["compare_kv_methods", "format_comparison", "key_bounds_ratio", "kv_bytes_per_token", "save_comparison"]

#: Settings that must match for a saved result to be reused (the rest only affect logging/caching).
_SAME_EVAL = ("tasks", "lengths", "depths", "trials", "pairs", "multikey_lengths", "queries", "ppl_context",
              "ppl_tokens", "heldout_percent", "max_source_files", "seed", "kv_budget_fraction")
#: The engine's policy knobs a saved policy result must share (sinks and window change what is kept).
POLICY_KNOBS = ("kv_sink_tokens", "kv_window")


def kv_bytes_per_token(model: str, dtype: str, kv_cache_dtype: str, block_size: int = 16) -> tuple[int, int]:
    """(bytes of one token under `kv_cache_dtype`, under the model's own dtype), all layers."""
    from kvflow.config import EngineConfig

    cfg = EngineConfig.create(model, dtype=dtype).model
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, cfg.dtype)
    return (KVCacheSpec.for_format(kv_cache_dtype, *shape).bytes_per_token,
            KVCacheSpec.for_format("auto", *shape).bytes_per_token)


def key_bounds_ratio(model: str, dtype: str, block_size: int = 16) -> float:
    """Quest's key bounds (min and max per block, layer and kv head, in the model's dtype) per token,
    relative to the model's dense KV: memory Quest adds on top of the cache."""
    from kvflow.config import EngineConfig

    cfg = EngineConfig.create(model, dtype=dtype).model
    spec = dataclasses.replace(KVCacheSpec.for_format("auto", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                      block_size, cfg.dtype), key_bounds_dtype=cfg.dtype)
    return spec.key_bounds_bytes_per_block / block_size / spec.bytes_per_token


def retrieval_keys_ratio(model: str, dtype: str, retrieval_model: str | None = None) -> float:
    """SpeContext's retrieval keys (with the window and position each was computed from) per token,
    relative to the model's dense KV: memory SpeContext adds on top of the cache."""
    from kvflow.assets import default_retrieval_path
    from kvflow.config import EngineConfig
    from kvflow.model.retrieval_head import RetrievalHeadConfig

    cfg = EngineConfig.create(model, dtype=dtype).model
    head = RetrievalHeadConfig.from_dir(Path(retrieval_model) if retrieval_model else default_retrieval_path())
    dense = KVCacheSpec.for_format("auto", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, cfg.dtype)
    return head.key_cache_bytes_per_token / dense.bytes_per_token


def compare_kv_methods(make_llm: Callable[[KVMethod], Any], model: str, dtype: str, methods: list[KVMethod],
                       config: EvalConfig, out: Path, reuse: bool = True, log: Callable[[str], None] | None = None,
                       policy_knobs: dict[str, Any] | None = None, block_size: int = 16) -> list[dict[str, Any]]:
    """Run (or reuse) the evaluation for every method; returns one summary row per method.

    `make_llm(method)` builds the engine for a method (`KVMethod.engine_args`); `policy_knobs` are the
    sinks and window those engines use (`POLICY_KNOBS`), checked when reusing a policy's result.
    """
    knobs = policy_knobs or {}
    sizes = {fmt: kv_bytes_per_token(model, dtype, fmt, KVMethod(fmt).block_size(block_size) or block_size)
             for fmt in dict.fromkeys(m.kv_cache_dtype for m in methods)}
    extra = {"quest": key_bounds_ratio(model, dtype, block_size) if any(m.kv_policy == "quest" for m in methods)
             else 0.0,
             "specontext": retrieval_keys_ratio(model, dtype, knobs.get("retrieval_model"))
             if any(m.kv_policy == "specontext" for m in methods) else 0.0}
    rows = []
    for method in methods:
        folder = out / method.folder
        run_config = dataclasses.replace(config, kv_budget_fraction=method.fraction)
        engine = {"kv_cache_dtype": method.kv_cache_dtype, "kv_policy": method.kv_policy}
        if method.kv_policy != "none":
            engine.update({k: knobs[k] for k in POLICY_KNOBS if k in knobs})
        # A SpeContext result holds for the retrieval head it was measured with (a retrained one is new).
        head = _retrieval_head_digest(knobs.get("retrieval_model")) if method.kv_policy == "specontext" else None
        result = _load(folder / "results.json", run_config, engine) if reuse else None
        if result is not None and head is not None and _read(folder / "retrieval_head.sha256") != head:
            result = None
        if result is None:
            if log:
                log(f"--- {method.name}")
            llm = make_llm(method)
            evaluated = run_eval(llm, run_config, log=log)
            save_results(evaluated, folder)
            if head is not None:
                (folder / "retrieval_head.sha256").write_text(head)
            result = evaluated.to_dict(samples=False)
            del llm
        elif log:
            log(f"--- {method.name}: reusing {folder / 'results.json'}")
        rows.append(_summary(method, result, *sizes[method.kv_cache_dtype], extra.get(method.kv_policy, 0.0)))
    return rows


def _retrieval_head_digest(retrieval_model: str | None) -> str:
    import hashlib

    from kvflow.assets import default_retrieval_path

    path = Path(retrieval_model) if retrieval_model else default_retrieval_path()
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _load(path: Path, config: EvalConfig, engine: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result if its evaluation settings and engine KV settings are this run's (results
    saved before KV policies existed read as kv_policy none)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    saved = data.get("config", {})
    current = json.loads(json.dumps({k: getattr(config, k) for k in _SAME_EVAL}))
    cache = {"kv_policy": "none", **data.get("engine", {}).get("cache", {})}
    same_eval = all(saved.get(k) == current[k] for k in _SAME_EVAL)
    return data if same_eval and all(cache.get(k) == v for k, v in engine.items()) else None


def _summary(method: KVMethod, result: dict[str, Any], kv_bytes: int, dense_bytes: int,
             bounds_ratio: float = 0.0) -> dict[str, Any]:
    ppl = result.get("perplexity") or {}
    pk = result.get("passkey") or {}
    mk = result.get("multikey") or {}

    def per_length(grid: dict[str, Any]) -> dict[str, float]:
        if not grid:
            return {}
        acc = grid["accuracy"]  # rows x lengths
        return {str(n): sum(row[j] for row in acc) / len(acc) for j, n in enumerate(grid["lengths"])}

    kept, read = method.kv_ratios(kv_bytes / dense_bytes, bounds_ratio)
    cache = (result.get("engine") or {}).get("cache") or {}
    # KIVI's ring: R + 32 tokens of the model's dtype per running sequence, outside the blocks
    ring = cache.get("kv_residual_tokens", KIVI_DEFAULT_RESIDUAL) + KIVI_GROUP \
        if method.kv_cache_dtype in KIVI_FORMATS else 0
    lengths = sorted({int(n) for grid in (pk, mk) for n in (grid.get("lengths") or [])})
    return {
        "method": method.name, "kv_cache_dtype": method.kv_cache_dtype, "kv_policy": method.kv_policy,
        "kv_budget_fraction": method.fraction, "kv_bytes_per_token": kv_bytes, "kv_bytes_ratio": kv_bytes / dense_bytes,
        "kv_kept_ratio": kept, "kv_read_ratio": read, "block_size": cache.get("block_size"),
        "kv_ring_tokens": ring,  # per sequence, in the model's dtype (KIVI; 0 otherwise)
        # bytes a sequence of n tokens holds, per token, relative to the model's dtype: blocks plus ring
        "kv_kept_ratio_by_length": {str(n): kept + ring / n for n in lengths},
        # the share of prompt tokens the budgets really covered (more than the fraction where the floor wins)
        "kept_share": (result.get("kv_budget") or {}).get("kept_share"),
        "perplexity": ppl.get("perplexity"), "passkey": pk.get("mean_accuracy"), "multikey": mk.get("mean_accuracy"),
        "passkey_by_length": per_length(pk), "multikey_by_length": per_length(mk),
    }


def format_comparison(rows: list[dict[str, Any]], baseline: str = "auto") -> str:
    """The table: one row per method; Δ ppl against `baseline` (a method name; else the first row)."""
    base = next((r for r in rows if r["method"] == baseline), rows[0])
    width = max(15, *(len(r["method"]) for r in rows))
    head = f"{'method':<{width}} {'bytes/token':>11} {'KV kept':>8} {'KV read':>8} {'perplexity':>10} " \
           f"{'Δ ppl':>8} {'passkey':>8} {'multikey':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl, ref = r["perplexity"], base["perplexity"]
        delta = f"{100 * (ppl / ref - 1):+.2f}%" if ppl is not None and ref else "-"
        lines.append(f"{r['method']:<{width}} {r['kv_bytes_per_token']:>11,} {r['kv_kept_ratio']:>8.3f} "
                     f"{r['kv_read_ratio']:>8.3f} {_num(ppl, '.3f'):>10} {delta:>8} {_num(r['passkey'], '.3f'):>8} "
                     f"{_num(r['multikey'], '.3f'):>9}")
    if any(r["kv_policy"] != "none" for r in rows):
        lines.append("KV kept / read: bytes per token relative to the model's dtype (format x budget fraction; "
                     "quest keeps all KV plus its key bounds, and reads the fraction of the KV and every block's "
                     "bounds per decode step; specontext keeps all KV plus its retrieval keys, and reads the "
                     "fraction)")
        lines.append(PPL_PREFILL_NOTE)
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
