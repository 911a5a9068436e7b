"""The printed table and the JSON result file of a run.

The JSON holds the settings, the summary and every request's timings, so plots and comparisons
(``serve-plot``) can be redrawn later from files alone. Non-finite numbers (a NaN percentile of an
empty set, an infinite rate) become ``null`` / ``"inf"`` so the file is strict JSON.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from kvflow.bench.serve.metrics import percentile_key

_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def jsonable(value: Any) -> Any:
    """``value`` with NaN -> None and +-inf -> "inf"/"-inf", recursively."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def result_stem(doc: dict[str, Any]) -> str:
    """File-name stem of a result: ``LABEL-DATASET-rRATE-YYYYmmdd-HHMMSS``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = f"{doc['label']}-{doc['dataset']}-r{doc['rate_label']}-{stamp}"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", raw)


def save_result(doc: dict[str, Any], result_dir: str | Path, stem: str | None = None) -> Path:
    """Write ``doc`` as ``RESULT_DIR/STEM.json`` and return the path."""
    out = Path(result_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or result_stem(doc)
    path = out / f"{stem}.json"
    n = 1
    while path.exists():  # two runs in the same second: keep both
        n += 1
        path = out / f"{stem}-{n}.json"
    path.write_text(json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result file written by ``save_result``."""
    doc = json.loads(Path(path).read_text())
    if doc.get("kind") != "kvflow-bench-serve":
        raise ValueError(f"{path} is not a kvflow bench serve result")
    return doc


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(doc: dict[str, Any]) -> str:
    """A human-readable report of one run."""
    s = doc["summary"]
    width = 52
    rows: list[str] = []

    def line(name: str, value: Any, digits: int = 2) -> None:
        rows.append(f"{name:<36}{_fmt(value, digits):>16}")

    def title(text: str) -> None:
        rows.append(f"{' ' + text + ' ':-^{width}}")

    rows.append(f"{' Serving benchmark: ' + str(doc['label']) + ' ':=^{width}}")
    rows.append(f"Model: {doc['model']}")
    rows.append(f"Dataset: {doc['dataset']}, request rate: {doc['rate_label']}, "
                f"max concurrency: {doc['config'].get('max_concurrency') or 'none'}")
    goodput = s.get("goodput")
    if goodput:
        rows.append("SLOs: " + ", ".join(f"{k} <= {v:g} ms" for k, v in goodput["slos_ms"].items()))
    rows.append("-" * width)
    line("Successful requests", s["completed"])
    line("Failed requests", s["failed"])
    line("Benchmark duration (s)", s["duration_s"])
    line("Total input tokens", s["total_input_tokens"])
    line("Total generated tokens", s["total_output_tokens"])
    line("Request throughput (req/s)", s["request_throughput"])
    line("Output token throughput (tok/s)", s["output_throughput"])
    line("Total token throughput (tok/s)", s["total_token_throughput"])
    if goodput:
        line("Request goodput (req/s)", goodput["request_goodput"])
        for key, frac in goodput["attainment"].items():
            line(f"SLO attainment: {key} (%)", 100.0 * frac)
    for key, name in _METRICS:
        dist = s[key]
        title(name)
        line(f"Mean {name} (ms)", dist["mean"])
        line(f"Median {name} (ms)", dist["median"])
        for p in s.get("percentiles", []):
            if p == 50:
                continue  # the median, already shown
            line(f"P{p:g} {name} (ms)", dist.get(percentile_key(p)))
    if s.get("multi_turn"):
        rows.extend(_multi_turn_rows(s["multi_turn"], s.get("percentiles", []), width))
    server = doc.get("server") or {}
    if server.get("kv_transfers"):
        title("KV transfer (server side)")
        line("Transfers", int(server["kv_transfers"]))
        line("Bytes per request", server["kv_transfer_bytes_per_request"], 0)
        line("Mean exposed transfer (ms)", server["kv_transfer_exposed_ms_mean"])
        share = server["kv_transfer_share_of_ttft"]
        line("Share of TTFT (%)", None if share is None else 100.0 * share)
        line("Loads recomputed (fallbacks)", int(server["kv_load_fallbacks"]))
    rows.append("=" * width)
    if s["errors"]:
        rows.append("Errors:")
        rows.extend(f"  {n} x {msg}" for msg, n in s["errors"].items())
    short = s["requested_output_tokens"] - s["total_output_tokens"]
    if short > 0:
        rows.append(f"Note: {short} requested output tokens were not generated (EOS honoured?)")
    return "\n".join(rows)


def _multi_turn_rows(m: dict[str, Any], percentiles: list[float], width: int) -> list[str]:
    """The multi-turn section: session counts, prompt growth, and TTFT / E2E of turn 1 vs later."""
    rows = [f"{' Multi-turn sessions ':-^{width}}"]

    def line(name: str, value: Any, digits: int = 2) -> None:
        rows.append(f"{name:<36}{_fmt(value, digits):>16}")

    line("Sessions completed", f"{m['sessions_completed']} / {m['sessions']}")
    line("Turns completed", f"{m['turns_completed']} / {m['turns']}")
    line("Output token throughput (tok/s)", m["output_throughput"])
    line("Total token throughput (tok/s)", m["total_token_throughput"])
    line("Mean prompt tokens per turn", m["mean_prompt_tokens"], 1)
    by_turn = m.get("mean_prompt_tokens_by_turn") or []
    for t in sorted({1, len(by_turn)} if by_turn else set()):
        line(f"Mean prompt tokens, turn {t}", by_turn[t - 1], 1)
    rows.append(f"{'':<28}{'turn 1':>12}{'turns >= 2':>12}")
    for metric, name in (("ttft", "TTFT"), ("e2e", "E2E")):
        first, later = m[f"{metric}_ms_first_turn"], m[f"{metric}_ms_later_turns"]
        keys = [("mean", "Mean"), *((percentile_key(p), f"P{p:g}") for p in percentiles)]
        for key, label in keys:
            rows.append(f"{label + ' ' + name + ' (ms)':<28}{_fmt(first.get(key)):>12}{_fmt(later.get(key)):>12}")
    return rows
