"""Accuracy against KV bytes: the same evaluation under several KV-cache formats, one table and
one figure (`kvflow eval --compare-kv auto,int8,fp8_e4m3 ...`).

Each format's full results go to <out>/<format>/ as a plain `kvflow eval` writes them; a format
whose results.json there was made with the same evaluation settings is reused (`reuse=True`), so
adding a format to the figure costs one run. The x axis is the KV bytes one token takes (all layers,
keys and values, scales included) relative to the model's own dtype, from the KV-cache spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.eval.report import save_results
from kvflow.eval.runner import EvalConfig, run_eval

#: Settings that must match for a saved result to be reused (the rest only affect logging/caching).
_SAME_EVAL = ("tasks", "lengths", "depths", "trials", "pairs", "multikey_lengths", "queries", "ppl_context",
              "ppl_tokens", "heldout_percent", "max_source_files", "seed")


def kv_bytes_per_token(model: str, dtype: str, kv_cache_dtype: str, block_size: int = 16) -> tuple[int, int]:
    """(bytes of one token under `kv_cache_dtype`, under the model's own dtype), all layers."""
    from kvflow.config import EngineConfig

    cfg = EngineConfig.create(model, dtype=dtype).model
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, cfg.dtype)
    return (KVCacheSpec.for_format(kv_cache_dtype, *shape).bytes_per_token,
            KVCacheSpec.for_format("auto", *shape).bytes_per_token)


def compare_kv_formats(make_llm: Callable[[str], Any], model: str, dtype: str, formats: list[str],
                       config: EvalConfig, out: Path, reuse: bool = True,
                       log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) the evaluation for every format; returns one summary row per format."""
    rows = []
    for fmt in formats:
        folder = out / fmt
        result = _load(folder / "results.json", config) if reuse else None
        if result is None:
            if log:
                log(f"--- kv_cache_dtype={fmt}")
            llm = make_llm(fmt)
            evaluated = run_eval(llm, config, log=log)
            save_results(evaluated, folder)
            result = evaluated.to_dict(samples=False)
            del llm
        elif log:
            log(f"--- kv_cache_dtype={fmt}: reusing {folder / 'results.json'}")
        rows.append(_summary(fmt, result, *kv_bytes_per_token(model, dtype, fmt)))
    return rows


def _load(path: Path, config: EvalConfig) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    saved = data.get("config", {})
    current = json.loads(json.dumps({k: getattr(config, k) for k in _SAME_EVAL}))
    return data if all(saved.get(k) == current[k] for k in _SAME_EVAL) else None


def _summary(fmt: str, result: dict[str, Any], kv_bytes: int, dense_bytes: int) -> dict[str, Any]:
    ppl = result.get("perplexity") or {}
    pk = result.get("passkey") or {}
    mk = result.get("multikey") or {}

    def per_length(grid: dict[str, Any]) -> dict[str, float]:
        if not grid:
            return {}
        acc = grid["accuracy"]  # rows x lengths
        return {str(n): sum(row[j] for row in acc) / len(acc) for j, n in enumerate(grid["lengths"])}

    return {
        "kv_cache_dtype": fmt, "kv_bytes_per_token": kv_bytes, "kv_bytes_ratio": kv_bytes / dense_bytes,
        "perplexity": ppl.get("perplexity"), "passkey": pk.get("mean_accuracy"), "multikey": mk.get("mean_accuracy"),
        "passkey_by_length": per_length(pk), "multikey_by_length": per_length(mk),
    }


def format_comparison(rows: list[dict[str, Any]], baseline: str = "auto") -> str:
    base = next((r for r in rows if r["kv_cache_dtype"] == baseline), rows[0])
    head = f"{'kv_cache_dtype':<15} {'bytes/token':>11} {'vs full':>8} {'perplexity':>10} {'Δ ppl':>8} " \
           f"{'passkey':>8} {'multikey':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl, ref = r["perplexity"], base["perplexity"]
        delta = f"{100 * (ppl / ref - 1):+.2f}%" if ppl is not None and ref else "-"
        lines.append(f"{r['kv_cache_dtype']:<15} {r['kv_bytes_per_token']:>11,} {r['kv_bytes_ratio']:>8.3f} "
                     f"{_num(ppl, '.3f'):>10} {delta:>8} {_num(r['passkey'], '.3f'):>8} "
                     f"{_num(r['multikey'], '.3f'):>9}")
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def save_comparison(rows: list[dict[str, Any]], out: Path, title: str) -> tuple[Path, Path]:
    """kv_compare.json and kv_compare.png: perplexity, passkey and multi-key against KV bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "kv_compare.json"
    json_path.write_text(json.dumps(rows, indent=1))
    panels = [("perplexity", "held-out perplexity (lower is better)"), ("passkey", "passkey accuracy"),
              ("multikey", "multi-key recall")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    try:
        markers = "osD^vP*Xh<>"
        for ax, (key, label) in zip(axes, panels):
            for i, r in enumerate(rows):
                if r[key] is not None:
                    ax.scatter(r["kv_bytes_ratio"], r[key], s=45, marker=markers[i % len(markers)],
                               color=f"C{i % 10}", label=r["kv_cache_dtype"], alpha=0.85)
            ax.set_xlabel("KV bytes per token (relative to the model's dtype)")
            ax.set_ylabel(label)
            ax.set_xlim(0, 1.1 * max(r["kv_bytes_ratio"] for r in rows))
            if key != "perplexity":
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        png_path = out / "kv_compare.png"
        fig.savefig(png_path, dpi=110)
    finally:
        plt.close(fig)
    return json_path, png_path
