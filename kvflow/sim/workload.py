"""Request streams for the simulator: Poisson with length distributions, traces, or a recorded run.

The same generators as `kvflow bench serve` (arrivals, lengths, the Azure trace loader), so a
simulated stream and a measured one are the same stream; `from_bench_result` replays exactly the
requests of a saved `kvflow bench serve` run, which is how the simulator is validated.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvflow.bench.serve.arrivals import arrival_offsets
from kvflow.bench.serve.datasets import sample_lengths
from kvflow.bench.serve.trace import load_trace, trace_offsets


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"a request needs >= 1 prompt and output token, got {self.prompt_len}, {self.output_len}")


def poisson_requests(num: int, rate: float, input_len: int, output_len: int, range_ratio: float = 0.0,
                     seed: int = 0, burstiness: float = 1.0) -> list[SimRequest]:
    """`num` requests at `rate` req/s (gamma gaps; burstiness 1 = Poisson), lengths uniform around the means."""
    rng = np.random.default_rng([seed, 0])
    ins = sample_lengths(input_len, range_ratio, num, rng)
    outs = sample_lengths(output_len, range_ratio, num, rng)
    offsets = arrival_offsets(num, rate, burstiness, np.random.default_rng([seed, 1]))
    return [SimRequest(float(t), int(i), int(o)) for t, i, o in zip(offsets, ins, outs)]


def trace_requests(path: str | Path, limit: int | None = None, rate: float | None = None, seed: int = 0,
                   max_input_len: int | None = None, max_output_len: int | None = None) -> list[SimRequest]:
    """A trace's lengths (capped); its own timestamps, or Poisson arrivals at `rate` if given."""
    rows = load_trace(path, limit)
    if rate is None:
        offsets = trace_offsets(rows)
    else:
        offsets = arrival_offsets(len(rows), rate, 1.0, np.random.default_rng([seed, 1]))
    cap_in, cap_out = max_input_len or 2**31, max_output_len or 2**31
    return [SimRequest(float(t), max(1, min(r.context_tokens, cap_in)), max(1, min(r.generated_tokens, cap_out)))
            for t, r in zip(offsets, rows)]


def add_workload_args(parser: argparse.ArgumentParser, input_len: int, output_len: int, range_ratio: float) -> None:
    """The stream flags `kvflow simulate` and `kvflow plan` share: random lengths or a trace."""
    parser.add_argument("--random-input-len", type=int, default=input_len)
    parser.add_argument("--random-output-len", type=int, default=output_len)
    parser.add_argument("--random-range-ratio", type=float, default=range_ratio)
    parser.add_argument("--trace-file", default=None)
    parser.add_argument("--max-input-len", type=int, default=None)
    parser.add_argument("--max-output-len", type=int, default=None)


def requests_from_args(args: argparse.Namespace, rate: float | None, num: int | None, trace: bool) -> list[SimRequest]:
    """The stream those flags describe at `rate`: the trace's lengths (`num` rows, None: all), or
    `num` Poisson requests with random lengths."""
    if trace:
        return trace_requests(args.trace_file, num, rate, args.seed, args.max_input_len, args.max_output_len)
    assert num is not None and rate is not None, "a random stream needs a size and a rate"
    return poisson_requests(num, rate, args.random_input_len, args.random_output_len, args.random_range_ratio,
                            args.seed)


def from_bench_result(doc: dict[str, Any] | str | Path) -> list[SimRequest]:
    """The requests of a `kvflow bench serve` result: send times, the server's prompt token count
    (BOS included) and the output tokens actually produced."""
    if not isinstance(doc, dict):
        doc = json.loads(Path(doc).read_text())
    requests = []
    for r in doc["requests"]:
        prompt = r.get("prompt_tokens") or r["prompt_len"]
        output = r.get("output_tokens") or r["output_len"]
        requests.append(SimRequest(float(r.get("start_s", r["arrival_s"])), int(prompt), int(output)))
    return requests  # in the run's order, so results line up with its records
