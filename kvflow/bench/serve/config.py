"""The parameters of one ``kvflow bench serve`` run, checked before anything is sent.

Kept apart from argparse so tests and scripts can build a run directly, and so the JSON result
records exactly what was run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvflow.bench.serve.datasets import DATASETS
from kvflow.bench.serve.metrics import DEFAULT_PERCENTILES

#: Default number of prompts for the synthetic datasets (a trace defaults to all its rows).
DEFAULT_NUM_PROMPTS = 200


@dataclass
class ServeBenchConfig:
    """Everything that defines a run. ``request_rate`` None: inf, or the trace's own timing.

    For ``multi-turn`` the rate is of session starts and ``max_concurrency`` counts sessions.
    """

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    dataset: str = "random"
    num_prompts: int | None = None
    request_rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    random_input_len: int = 256
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    shared_prefix_len: int = 512
    num_prefix_groups: int = 4
    num_sessions: int = 48
    num_turns: int = 4
    first_turn_len: int = 1536
    turn_input_len: int = 128
    think_time: float = 0.0  # multi-turn: mean seconds between an answer and the next turn (exponential)
    trace_file: str | None = None
    trace_time_scale: float = 1.0
    max_input_len: int | None = None
    max_output_len: int | None = None
    goodput_ms: dict[str, float] = field(default_factory=dict)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    ignore_eos: bool = True
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    timeout_s: float = 1800.0
    probe: bool = True
    label: str | None = None
    result_dir: str | None = "bench_results/serve"
    plots: bool = True
    progress: bool = True

    @property
    def api(self) -> str:
        """``chat`` for a chat-completions endpoint, else ``completions``."""
        return "chat" if "chat" in self.endpoint else "completions"

    @property
    def url(self) -> str:
        """Full request URL."""
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")

    def validate(self) -> None:
        """Raise ValueError on a setting that cannot run (before any request is made)."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "trace" and not self.trace_file:
            raise ValueError("--dataset trace needs --trace-file CSV")
        if self.dataset == "multi-turn" and self.num_prompts is not None:
            raise ValueError("--dataset multi-turn sends --num-sessions x --num-turns requests; "
                             "--num-prompts does not apply")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        for name in ("random_input_len", "random_output_len", "shared_prefix_len", "num_prefix_groups",
                     "num_sessions", "num_turns", "first_turn_len", "turn_input_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_input_len", "max_output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.think_time >= 0:
            raise ValueError(f"--think-time must be >= 0 s, got {self.think_time}")
        if not 0 <= self.random_range_ratio < 1:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}")
        if not self.trace_time_scale >= 0:
            raise ValueError(f"--trace-time-scale must be >= 0, got {self.trace_time_scale}")

    def rate_label(self) -> str:
        """How the run's arrival rate is named in files and plots: ``4``, ``inf``, ``trace-x0.5``."""
        if self.request_rate is None:
            return f"trace-x{self.trace_time_scale:g}" if self.dataset == "trace" else "inf"
        return "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, without the API key."""
        out = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        out["percentiles"] = list(self.percentiles)
        if self.request_rate is not None and math.isinf(self.request_rate):
            out["request_rate"] = "inf"
        return out
