"""The --compare-kv figure: perplexity, passkey and multi-key recall against KV bytes per token.

A policy's fractions (per format) are joined into one line so its trade-off reads at a glance;
plain formats are single points. Quest is drawn hollow at the share of KV it *reads* per decode
step, because it frees nothing: putting it on the same "bytes kept" axis as the evicting policies
unmarked would credit it with memory it does not save. KIVI sits at its blocks' bytes; the note under
the figure gives the dense ring each running sequence adds (R + 32 tokens in the model's dtype).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvflow.eval.kv_methods import EVICTING


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped for drawing: a policy's fractions (per format) form one line; a plain format is a point."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = r["method"] if r["kv_policy"] == "none" else r["method"].rpartition("@")[0]
        groups.setdefault(key, []).append(r)
    return groups


def plot_x(row: dict[str, Any]) -> float:
    """Where a row sits on the KV-bytes axis: bytes kept, or for quest and specontext (which keep all)
    bytes read."""
    return row["kv_kept_ratio"] if row["kv_policy"] in (*EVICTING, "none") else row["kv_read_ratio"]


def save_comparison(rows: list[dict[str, Any]], out: Path, title: str) -> tuple[Path, Path]:
    """kv_compare.json and kv_compare.png: perplexity, passkey and multi-key against KV bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "kv_compare.json"
    json_path.write_text(json.dumps(rows, indent=1))
    policies = any(r["kv_policy"] != "none" for r in rows)
    panels = [("perplexity", "held-out perplexity (lower is better)"), ("passkey", "passkey accuracy"),
              ("multikey", "multi-key recall")]
    fig, axes = plt.subplots(1, 3, figsize=(17 if policies else 15, 4.4))
    try:
        plain_markers, policy_markers = "oPX*hvp<>", {"streaming": "s", "h2o": "^", "snapkv": "D", "quest": "o",
                                                       "specontext": "*"}
        for i, (name, series) in enumerate(_series(rows).items()):
            policy = series[0]["kv_policy"]
            marker = plain_markers[i % len(plain_markers)] if policy == "none" else policy_markers[policy]
            hollow = policy not in (*EVICTING, "none")
            label = name + (" (x: KV read per step; keeps all KV)" if hollow else "")
            color = f"C{i % 10}"
            series = sorted(series, key=plot_x)
            for ax, (key, _) in zip(axes, panels):
                points = [(plot_x(r), r[key]) for r in series if r[key] is not None]
                if not points:
                    continue
                xs, ys = zip(*points)
                if len(points) > 1:
                    ax.plot(xs, ys, color=color, alpha=0.5, linewidth=1, linestyle=":" if hollow else "-")
                ax.scatter(xs, ys, s=45, marker=marker, label=label, alpha=0.85, linewidths=1.4,
                           facecolors="none" if hollow else color, edgecolors=color)
        for ax, (key, label) in zip(axes, panels):
            ax.set_xlabel("KV bytes kept per token (relative to the model's dtype)")
            ax.set_ylabel(label)
            ax.set_xlim(0, 1.1 * max(plot_x(r) for r in rows))
            if key != "perplexity":
                ax.set_ylim(-0.05, 1.05)
            else:
                ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
        if policies:
            axes[0].set_title("scored in prefill: h2o, snapkv, quest, specontext not shown", fontsize=8)
            legend = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
            fig.suptitle(title, fontsize=10)
            fig.tight_layout(rect=(0, 0, 0.81, 1))
            fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(0.81, 0.5),
                       fontsize=8)
        else:
            axes[0].legend(fontsize=8)
            fig.suptitle(title, fontsize=10)
            fig.tight_layout()
        ring = max((r.get("kv_ring_tokens") or 0) for r in rows)
        if ring:
            fig.text(0.01, 0.005, f"kivi4/kivi2: x = the blocks' bytes (codes, fp16 scales and zeros); each running "
                     f"sequence also holds its newest {ring - 32}-{ring - 1} tokens dense in a ring of {ring} tokens "
                     f"of the model's dtype, plus {ring} / context length on this axis", fontsize=7)
            fig.subplots_adjust(bottom=0.16)
        png_path = out / "kv_compare.png"
        fig.savefig(png_path, dpi=110)
    finally:
        plt.close(fig)
    return json_path, png_path
