"""Accuracy against bits per weight: the same evaluation on quantised copies of one model
(`kvflow eval --compare-weights dense,q8_0,int8,q4_k,q4_k+awq,bipolar2..8,bipolar2..8+awq`).

An entry is `dense` (the checkpoint as it is), a format (`q8_0`, `q4_0`, `q4_k`, `int8`), bipolar-INT
with its bits (`bipolar4`; a range `bipolar2..8` expands to seven entries), each optionally `+awq`
(calibrated, see kvflow/model/quant/awq.py; otherwise round-to-nearest). Two options are run-time
choices: `+a8` (int8 only: W8A8, per-token int8 activations) and `+head` (the LM head quantised too, in
the same format: the dense checkpoint is quantised at load, round to nearest, with
`--quantization-lm-head`, so not with `+awq`). Each entry's quantised model
is written once under <out>/models/<format[-awq]>/ (shared by the entries that differ only in run-time
options) by `kvflow quantize`'s code and reused while its
quantize_report.json says it was made the same way; its evaluation goes to <out>/<entry>/ as a plain
`kvflow eval` writes it and is reused when its settings match. The x axis is bits per weight of the
quantised projections, scales included (the embedding, norms and LM head stay in the model's dtype
and are not counted; the table also gives the whole model's bits per weight).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvflow.config import QUANT_FORMATS
from kvflow.eval.report import save_results
from kvflow.eval.runner import EvalConfig, run_eval

_ENTRY = re.compile(r"^(dense|q8_0|q4_0|q4_k|int8|bipolar(\d)(?:\.\.(\d))?)((?:\+(?:awq|a8|head))*)$")
_OPTIONS = ("awq", "a8", "head")  # in the order a name spells them
#: Settings that must match for a saved evaluation to be reused.
_SAME_EVAL = ("tasks", "lengths", "depths", "trials", "pairs", "multikey_lengths", "queries", "ppl_context",
              "ppl_tokens", "heldout_percent", "max_source_files", "seed")


@dataclass(frozen=True)
class WeightMethod:
    format: str = "dense"  # "dense" or a name of QUANT_FORMATS
    bits: int | None = None  # bipolar's bits
    awq: bool = False
    a8: bool = False  # int8 weights with int8 activations (W8A8)
    head: bool = False  # the LM head quantised at load too

    @property
    def name(self) -> str:
        base = f"bipolar{self.bits}" if self.format == "bipolar" else self.format
        return base + "".join(f"+{option}" for option in _OPTIONS if getattr(self, option))

    def engine_overrides(self) -> dict[str, Any]:
        """Engine settings the run-time options add: W8A8, and quantisation at load for a quantised head."""
        if not (self.a8 or self.head):
            return {}
        out: dict[str, Any] = {"quantization": self.format, "quantization_bits": self.bits}
        if self.a8:
            out["quantization_activation_bits"] = 8
        if self.head:
            out["quantization_lm_head"] = True
        return out

    @property
    def folder(self) -> str:
        return self.name.replace("+", "-")

    @property
    def checkpoint_folder(self) -> str:
        """Where its quantised checkpoint goes: shared by the entries that differ only in run-time options."""
        return WeightMethod(self.format, self.bits, self.awq).folder

    @property
    def params(self) -> dict[str, int]:
        return {"bits": self.bits} if self.bits is not None else {}


def parse_weight_methods(entries: tuple[str, ...] | list[str]) -> list[WeightMethod]:
    """Entries -> methods, strictly (a typo fails before the first long run); ranges expand in order."""
    methods: list[WeightMethod] = []
    for entry in entries:
        match = _ENTRY.match(entry.strip())
        if match is None:
            raise ValueError(f"{entry!r} is not dense, {', '.join(f for f in QUANT_FORMATS if f != 'bipolar')}, "
                             "bipolarN (N = 2..8) or bipolarA..B, optionally with +awq, +a8 (int8) or +head")
        base, low, high, suffix = match.groups()
        given = suffix.split("+")[1:]
        options = {option: option in given for option in _OPTIONS}
        if len(set(given)) < len(given):
            raise ValueError(f"{entry!r} repeats an option")
        if base == "dense" and any(options.values()):
            raise ValueError("dense has nothing to calibrate or quantise: drop its options")
        if options["a8"] and base != "int8":
            raise ValueError(f"{entry!r}: +a8 (int8 activations) is for int8 weights")
        if options["head"] and options["awq"]:
            raise ValueError(f"{entry!r}: +head quantises at load (round to nearest); it does not take +awq")
        if low is None:
            methods.append(WeightMethod(base, None, **options))
            continue
        lo, hi = int(low), int(high or low)
        if not 2 <= lo <= hi <= 8:
            raise ValueError(f"{entry!r}: bipolar takes 2 to 8 bits")
        methods.extend(WeightMethod("bipolar", n, **options) for n in range(lo, hi + 1))
    names = [m.name for m in methods]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"entries repeat: {', '.join(repeated)}")
    return methods


def quantised_model(model: str, method: WeightMethod, folder: Path,
                    calibration: Callable[[], Any], log: Callable[[str], None] | None = None) -> tuple[str, dict]:
    """The model directory to evaluate for `method` (made now unless an identical one exists) and its
    quantisation report ({} for dense)."""
    if method.format == "dense":
        return model, {}
    from kvflow.model.quant.quantize_model import quantize_checkpoint

    report_file = folder / "quantize_report.json"
    want = {"format": method.format, "method": "awq" if method.awq else "rtn", "params": method.params}
    if report_file.is_file():
        saved = json.loads(report_file.read_text())
        dense_head = saved.get("lm_head", "dense") == "dense"  # its entries' checkpoints keep the head dense
        if (all(saved.get(k) == v for k, v in want.items()) and dense_head
                and saved.get("source") == str(Path(model).resolve())):
            return str(folder), saved
    if log:
        log(f"--- quantising {model} as {method.name} into {folder}")
    report = quantize_checkpoint(model, method.format, params=method.params, method=want["method"],
                                 calibration=calibration() if method.awq else None, out_dir=folder)
    saved = {**report.to_dict(), "source": str(Path(model).resolve())}
    report_file.write_text(json.dumps(saved, indent=2) + "\n")
    return str(folder), saved


def compare_weight_methods(make_llm: Callable[[str, dict[str, Any]], Any], model: str, methods: list[WeightMethod],
                           config: EvalConfig, out: Path, calibration: Callable[[], Any], reuse: bool = True,
                           log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Quantise (or reuse), evaluate (or reuse) and summarise each method; `make_llm(model_dir, overrides)`
    builds the engine with the command's settings and the method's `engine_overrides`; `calibration()`
    gives AWQ's token ids (called when needed). A `+head` method still writes its round-to-nearest
    checkpoint (its report gives the projections' bits), but runs the dense one quantised at load: a
    checkpoint keeps its head as stored, and at load the projections are quantised to the same codes."""
    rows = []
    for method in methods:
        model_dir, report = quantised_model(model, method, out / "models" / method.checkpoint_folder, calibration,
                                            log)
        if method.head:
            model_dir = model
        folder = out / method.folder
        result = _load(folder / "results.json", config, model_dir) if reuse else None
        if result is None:
            if log:
                log(f"--- evaluating {method.name}")
            llm = make_llm(model_dir, method.engine_overrides())
            evaluated = run_eval(llm, config, log=log)
            save_results(evaluated, folder)
            result = evaluated.to_dict(samples=False)
            del llm
        elif log:
            log(f"--- {method.name}: reusing {folder / 'results.json'}")
        rows.append(_summary(method, report, result))
    return rows


def _load(path: Path, config: EvalConfig, model_dir: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    saved = data.get("config", {})
    current = json.loads(json.dumps({k: getattr(config, k) for k in _SAME_EVAL}))
    same = all(saved.get(k) == current[k] for k in _SAME_EVAL)
    return data if same and data.get("model") == model_dir else None


def _summary(method: WeightMethod, report: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    dense_bits = 32 if (result.get("engine") or {}).get("dtype") == "float32" else 16
    ppl = result.get("perplexity") or {}
    return {
        "method": method.name, "format": method.format, "bits": method.bits, "awq": method.awq,
        "a8": method.a8, "head": method.head,
        "bits_per_weight": report.get("bits_per_weight", dense_bits),
        "model_bits_per_weight": report.get("model_bits_per_weight", dense_bits),
        "weight_error": report.get("weight_error", 0.0),
        "fallbacks": sorted({f for f in (report.get("quantized") or {}).values() if f != method.format}),
        "perplexity": ppl.get("perplexity"),
        "passkey": (result.get("passkey") or {}).get("mean_accuracy"),
        "multikey": (result.get("multikey") or {}).get("mean_accuracy"),
    }


def format_weight_comparison(rows: list[dict[str, Any]]) -> str:
    """One row per method; Δ ppl against `dense` where it was evaluated (else the first row)."""
    base = next((r for r in rows if r["method"] == "dense"), rows[0])
    width = max(14, *(len(r["method"]) for r in rows))
    head = (f"{'method':<{width}} {'bits/w':>7} {'model b/w':>9} {'w error':>8} {'perplexity':>10} {'Δ ppl':>8} "
            f"{'passkey':>8} {'multikey':>9}  fallbacks")
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl, ref = r["perplexity"], base["perplexity"]
        delta = f"{100 * (ppl / ref - 1):+.2f}%" if ppl is not None and ref else "-"
        lines.append(f"{r['method']:<{width}} {r['bits_per_weight']:>7.2f} {r['model_bits_per_weight']:>9.2f} "
                     f"{r['weight_error']:>8.4f} {_num(ppl, '.3f'):>10} {delta:>8} {_num(r['passkey'], '.3f'):>8} "
                     f"{_num(r['multikey'], '.3f'):>9}  {', '.join(r['fallbacks'])}")
    lines.append("bits/w: the quantised projections' storage per weight, scales included; model b/w: every "
                 "tensor as stored (embedding, norms and LM head dense; +head adds a quantised copy of a tied head)")
    return "\n".join(lines)


def save_weight_comparison(rows: list[dict[str, Any]], out: Path, title: str) -> tuple[Path, Path]:
    """weight_compare.json and weight_compare.png: perplexity, passkey and multi-key against bits per weight;
    bipolar's bit widths drawn as one line per method (RTN, AWQ), other formats as points."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "weight_compare.json"
    json_path.write_text(json.dumps(rows, indent=1))
    panels = [("perplexity", "held-out perplexity (lower is better)"), ("passkey", "passkey accuracy"),
              ("multikey", "multi-key recall")]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = r["method"]
        if r["format"] == "bipolar":
            key = "bipolar" + (" +awq" if r["awq"] else " (rtn)") + (" +head" if r.get("head") else "")
        series.setdefault(key, []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    try:
        markers = "oPX*hvp<>sD^"
        for i, (name, group) in enumerate(series.items()):
            group = sorted(group, key=lambda r: r["bits_per_weight"])
            color, marker = f"C{i % 10}", markers[i % len(markers)]
            for ax, (key, _) in zip(axes, panels):
                points = [(r["bits_per_weight"], r[key]) for r in group if r[key] is not None]
                if not points:
                    continue
                xs, ys = zip(*points)
                if len(points) > 1:
                    ax.plot(xs, ys, color=color, alpha=0.6, linewidth=1)
                ax.scatter(xs, ys, s=45, marker=marker, color=color, label=name, alpha=0.85)
                if group[0]["format"] == "bipolar" and key == "perplexity":
                    for r in group:
                        ax.annotate(str(r["bits"]), (r["bits_per_weight"], r[key]), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3), color=color)
        for ax, (key, label) in zip(axes, panels):
            ax.set_xlabel("bits per weight of the quantised projections (scales included)")
            ax.set_ylabel(label)
            if key == "perplexity":
                ax.set_yscale("log")
            else:
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        png_path = out / "weight_compare.png"
        fig.savefig(png_path, dpi=110)
    finally:
        plt.close(fig)
    return json_path, png_path


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
