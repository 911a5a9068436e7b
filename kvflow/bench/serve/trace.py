"""The Azure LLM inference trace format: ``TIMESTAMP,ContextTokens,GeneratedTokens``.

A trace gives arrival times and token lengths but no prompt text (benchmarks synthesise prompts
of the given lengths). Timestamps are ISO date-times (``2023-11-16 18:17:03.9799600``, any number
of fractional digits) or plain seconds; only differences matter, so time zones are ignored.
A user's own file of the same shape loads the same way; header names are case-insensitive.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

_COLUMNS = ("timestamp", "contexttokens", "generatedtokens")
_EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace: when it arrived and how many tokens went in and came out.

    Times are integer microseconds: date-times as float seconds since 1970 keep only ~0.2 us, and
    replayed gaps should be the file's, digit for digit.
    """

    timestamp_us: int
    context_tokens: int
    generated_tokens: int


def parse_timestamp_us(text: str) -> int:
    """Microseconds of a trace timestamp: seconds as a number, or an ISO date-time (naive = UTC)."""
    text = text.strip()
    try:
        return round(float(text) * 1e6)
    except ValueError:
        pass
    # Python 3.11's fromisoformat accepts any number of fractional digits (7 in Azure's traces);
    # trim to 6 ourselves so the loader does not depend on that.
    head, dot, frac = text.partition(".")
    if dot:
        digits = "".join(c for c in frac if c.isdigit())
        rest = frac[len(digits):]
        text = f"{head}.{(digits + '000000')[:6]}{rest}"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return (dt - _EPOCH) // timedelta(microseconds=1)


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Rows of a trace CSV in time order (stable for ties), the first ``limit`` of them if given."""
    rows: list[TraceRow] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = {name.strip().lower(): name for name in (reader.fieldnames or [])}
        missing = [c for c in _COLUMNS if c not in fields]
        if missing:
            raise ValueError(
                f"{path}: trace CSV needs columns TIMESTAMP,ContextTokens,GeneratedTokens; "
                f"missing {missing} (found {reader.fieldnames})"
            )
        ts, ctx, gen = (fields[c] for c in _COLUMNS)
        for line, record in enumerate(reader, start=2):
            try:
                rows.append(
                    TraceRow(
                        timestamp_us=parse_timestamp_us(record[ts]),
                        context_tokens=int(record[ctx]),
                        generated_tokens=int(record[gen]),
                    )
                )
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line}: bad trace row {record}: {e}") from None
    rows.sort(key=lambda r: r.timestamp_us)
    if not rows:
        raise ValueError(f"{path}: trace has no rows")
    return rows[:limit] if limit is not None else rows


def trace_offsets(rows: list[TraceRow], time_scale: float = 1.0) -> np.ndarray:
    """Arrival offsets (s) relative to the first row, multiplied by ``time_scale``.

    ``time_scale`` 0.5 replays the trace twice as fast (twice the request rate), 2 half as fast.
    """
    if not time_scale >= 0:
        raise ValueError(f"trace time scale must be >= 0, got {time_scale}")
    if not rows:
        return np.zeros(0)
    first = rows[0].timestamp_us
    return np.array([(r.timestamp_us - first) / 1e6 for r in rows], dtype=np.float64) * time_scale
