"""Where kvflow's decode time goes: torch.profiler over a warmed-up engine, summed per ATen op.

Profiling is the first step of every performance change (issue "CPU performance"): it splits a
decode step into matmul time, attention, small elementwise ops and the per-op dispatch overhead
in between, so a change can be aimed at the largest share and its effect checked afterwards.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvflow.bench.throughput import make_prompts

#: ATen ops that do the matrix work; everything else is attention glue, elementwise or overhead.
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
                        "kvflow::decode_linear", "kvflow::linear_f32"})  # the last two: the C++ forward's GEMVs


@dataclass
class OpShare:
    name: str
    calls: int
    self_ms: float


@dataclass
class ProfileReport:
    model: str
    workload: str
    batch: int
    decode_steps: int
    ms_per_step: float  # wall time of one engine step, measured outside the profiler
    profiled_ms_per_step: float  # CPU time the profiler attributes to ops, per step
    matmul_ms_per_step: float
    ops_per_step: float  # ATen calls per step: what per-op dispatch overhead multiplies
    top_ops: list[OpShare] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_decode(model: str | Path, workload: str = "single", num_prompts: int = 64, input_len: int = 128,
                   decode_steps: int = 16, dtype: str = "bfloat16", seed: int = 0, top: int = 20,
                   engine_kwargs: dict[str, Any] | None = None) -> ProfileReport:
    """Profile `decode_steps` steps of greedy decoding of 1 (single) or `num_prompts` (offline) prompts.

    The prefill is run and timed separately, so the figures are decode only.
    """
    from torch.profiler import ProfilerActivity, profile

    from kvflow.llm import LLM
    from kvflow.sampling_params import SamplingParams

    if workload not in ("single", "offline"):
        raise ValueError(f"workload must be 'single' or 'offline', got {workload!r}")
    batch = 1 if workload == "single" else num_prompts
    # No prefix caching: the same prompts are run several times, and each run must prefill anew.
    llm = LLM(model=str(model), dtype=dtype, **{"enable_prefix_caching": False, **(engine_kwargs or {})})
    vocab = llm.engine.core.runner.model_config.vocab_size
    prompts = [{"prompt_token_ids": ids} for ids in make_prompts(batch, input_len, vocab, seed, 0)]
    warm = [{"prompt_token_ids": ids} for ids in make_prompts(batch, input_len, vocab, seed, 1)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)

    def run(max_tokens: int) -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    # Decode time = (prefill + n decode steps) - (prefill alone); the profile is differenced the same way.
    # Best of three each: on a shared machine one slow prefill-only run could hide the whole difference.
    prefill_only = min(run(1) for _ in range(3))
    with_decode = min(run(decode_steps + 1) for _ in range(3))
    ms_per_step = max(0.0, with_decode - prefill_only) / decode_steps * 1e3

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(1)
    prefill_ops = {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(decode_steps + 1)
    shares: list[OpShare] = []
    for e in prof.key_averages():
        calls, self_us = e.count, e.self_cpu_time_total
        base_calls, base_us = prefill_ops.get(e.key, (0, 0.0))
        calls, self_us = calls - base_calls, self_us - base_us
        if calls > 0 and self_us > 0:
            shares.append(OpShare(e.key, calls, self_us / 1e3))
    shares.sort(key=lambda s: s.self_ms, reverse=True)
    total_ms = sum(s.self_ms for s in shares)
    matmul_ms = sum(s.self_ms for s in shares if s.name in MATMUL_OPS)
    return ProfileReport(
        model=str(model), workload=workload, batch=batch, decode_steps=decode_steps, ms_per_step=ms_per_step,
        profiled_ms_per_step=total_ms / decode_steps, matmul_ms_per_step=matmul_ms / decode_steps,
        ops_per_step=sum(s.calls for s in shares) / decode_steps,
        top_ops=[OpShare(s.name, round(s.calls / decode_steps), s.self_ms / decode_steps) for s in shares[:top]],
    )


def format_report(report: ProfileReport) -> str:
    lines = [
        f"{report.model}: {report.workload} decode, batch {report.batch}, {report.decode_steps} steps",
        f"wall {report.ms_per_step:.2f} ms/step; profiled op time {report.profiled_ms_per_step:.2f} ms/step "
        f"(matmuls {report.matmul_ms_per_step:.2f}); {report.ops_per_step:.0f} ATen calls/step",
        f"{'op':<48} {'calls/step':>10} {'ms/step':>9} {'share':>6}",
    ]
    for op in report.top_ops:
        share = op.self_ms / report.profiled_ms_per_step if report.profiled_ms_per_step else 0.0
        lines.append(f"{op.name:<48} {op.calls:>10} {op.self_ms:>9.3f} {share:>6.1%}")
    return "\n".join(lines)


def save_report(report: ProfileReport, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
