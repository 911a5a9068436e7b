"""``kvflow bench kv-capacity``: what a KV-cache format buys at a fixed memory budget.

Why: a quantised KV cache is worth its accuracy cost only where KV memory binds. For each
``--kv-cache-dtype`` this builds the engine with the same ``--kv-cache-memory`` and reports the
blocks and tokens it holds, how many sequences of the workload's length fit at once, and then runs
an offline long-context workload (random prompts, greedy, ``ignore_eos``) through the engine step
by step, recording the most sequences that actually ran together and the throughput. Formats are
run in turn, ``--repeats`` rounds interleaved, so a noisy machine treats them alike; the median
round is reported, with each format's ratio to the first.

KIVI (kivi4, kivi2) keeps each running sequence's newest R + 32 tokens dense in a ring with one slot
per `max_num_seqs`, counted in the same budget as fixed bytes. Its `max_num_seqs` is therefore a
choice: too many slots eat the blocks, too few leave blocks idle. Unless `max_num_seqs` is given,
a KIVI format gets the most slots S whose ring still leaves blocks for S whole sequences of the
workload (`kivi_slots`), so the ring costs exactly what the sequences that fit use; the other formats
get one per prompt (they pay nothing per slot). KIVI pages in blocks of 32 tokens (the other formats
too when `block_size` is given).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvflow.sampling_params import SamplingParams


@dataclass
class CapacityResult:
    kv_cache_dtype: str
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    token_capacity: int  # tokens the blocks hold
    fits: int  # sequences of input_len + output_len that fit at once
    max_running: int  # the most sequences that ran in one step
    seconds: float  # median round
    output_tokens_per_s: float
    total_tokens_per_s: float
    num_preemptions: int
    max_num_seqs: int = 0  # the engine's limit (KIVI: its ring slots)
    fixed_bytes: int = 0  # budget outside the blocks (KIVI's ring, fp8's per-head scales)


def format_block_size(kv_cache_dtype: str, block_size: int | None) -> int | None:
    """The block size a format runs with: KIVI needs a multiple of 32 (32 unless `block_size` is one);
    None: the engine's default."""
    from kvflow.config import KIVI_CACHE_DTYPES

    if kv_cache_dtype in KIVI_CACHE_DTYPES and (block_size is None or block_size % 32):
        return 32
    return block_size


def kivi_slots(model: str, dtype: str, kv_cache_dtype: str, kv_cache_memory: float, seq_len: int,
               block_size: int, residual_tokens: int, limit: int) -> int:
    """KIVI's ring slots for a budget: the most S (<= `limit`) such that, after S slots of ring, the
    blocks still hold S whole sequences of `seq_len` tokens (1 if not even one fits)."""
    from kvflow.attention.kv_spec import KVCacheSpec
    from kvflow.config import EngineConfig

    cfg = EngineConfig.create(model, dtype=dtype).model
    budget = int(kv_cache_memory * 2**30)
    blocks_per_seq = -(-seq_len // block_size)
    best = 1
    for slots in range(1, limit + 1):
        spec = KVCacheSpec.for_format(kv_cache_dtype, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size,
                                      cfg.dtype, residual_tokens=residual_tokens, residual_slots=slots)
        if spec.num_blocks(budget) // blocks_per_seq >= slots:
            best = slots
    return best


def engine_settings(model: str, dtype: str, kv_cache_dtype: str, kv_cache_memory: float, num_prompts: int,
                    seq_len: int, block_size: int | None = None, max_num_seqs: int | None = None,
                    residual_tokens: int = 128) -> dict:
    """The block size and max_num_seqs one format runs with (see the module's docstring)."""
    from kvflow.config import KIVI_CACHE_DTYPES

    size = format_block_size(kv_cache_dtype, block_size)
    settings: dict = {"max_num_seqs": max_num_seqs or num_prompts}
    if size is not None:
        settings["block_size"] = size
    if kv_cache_dtype in KIVI_CACHE_DTYPES:
        settings["kv_residual_tokens"] = residual_tokens
        if max_num_seqs is None:
            settings["max_num_seqs"] = kivi_slots(model, dtype, kv_cache_dtype, kv_cache_memory, seq_len, size,
                                                  residual_tokens, num_prompts)
    return settings


def run_format(model: str, dtype: str, kv_cache_dtype: str, kv_cache_memory: float, prompts: list[list[int]],
               output_len: int, engine_kwargs: dict, run: bool = True) -> tuple[CapacityResult, float]:
    """One round of one format: a fresh engine, the workload once (not with `run=False`: only what
    fits); returns the result and seconds. `engine_kwargs` must hold max_num_seqs (`engine_settings`)."""
    from kvflow.llm import LLM

    llm = LLM(model=model, dtype=dtype, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
              enable_prefix_caching=False, **engine_kwargs)
    engine = llm.engine
    runner = engine.core.runner
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    max_running, seconds = 0, 0.0
    if run:
        llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up (fp8 calibrates)
        for i, ids in enumerate(prompts):
            engine.add_request(f"cap-{i}", {"prompt_token_ids": ids}, params)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            max_running = max(max_running, engine.stats().num_running)
        seconds = time.perf_counter() - start
    spec = runner.kv_spec
    seq_len = len(prompts[0]) + output_len
    blocks_per_seq = -(-seq_len // spec.block_size)
    input_tokens = sum(len(p) for p in prompts)
    output_tokens = output_len * len(prompts)
    result = CapacityResult(
        kv_cache_dtype=kv_cache_dtype, num_blocks=runner.num_blocks, block_size=spec.block_size,
        kv_bytes_per_token=spec.bytes_per_token, token_capacity=runner.num_blocks * spec.block_size,
        fits=runner.num_blocks // blocks_per_seq, max_running=max_running, seconds=seconds,
        output_tokens_per_s=output_tokens / seconds if run else 0.0,
        total_tokens_per_s=(input_tokens + output_tokens) / seconds if run else 0.0,
        num_preemptions=engine.core.scheduler.num_preemptions,
        max_num_seqs=engine.config.scheduler.max_num_seqs, fixed_bytes=spec.fixed_bytes,
    )
    return result, seconds


def run_capacity(model: str, dtype: str, formats: list[str], kv_cache_memory: float, num_prompts: int,
                 input_len: int, output_len: int, repeats: int = 1, seed: int = 0,
                 engine_kwargs: dict | None = None, block_size: int | None = None,
                 max_num_seqs: int | None = None, residual_tokens: int = 128,
                 count_only: bool = False) -> list[CapacityResult]:
    from kvflow.config import EngineConfig

    vocab = EngineConfig.create(model, dtype=dtype).model.vocab_size
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, min(1000, vocab)) for _ in range(input_len)] for _ in range(num_prompts)]
    rounds: dict[str, list[CapacityResult]] = {f: [] for f in formats}
    per_format = {f: {**engine_settings(model, dtype, f, kv_cache_memory, num_prompts, input_len + output_len,
                                        block_size, max_num_seqs, residual_tokens), **(engine_kwargs or {})}
                  for f in formats}
    for _ in range(repeats):
        for fmt in formats:
            result, _ = run_format(model, dtype, fmt, kv_cache_memory, prompts, output_len, per_format[fmt],
                                   run=not count_only)
            rounds[fmt].append(result)
    out = []
    for fmt in formats:
        results = sorted(rounds[fmt], key=lambda r: r.seconds)
        median = results[len(results) // 2]
        median.seconds = statistics.median(r.seconds for r in results)
        out.append(median)
    return out


def format_capacity(results: list[CapacityResult]) -> str:
    base = results[0]
    head = (f"{'kv_cache_dtype':<15} {'block':>5} {'blocks':>7} {'tokens':>9} {'fixed MiB':>9} {'seqs':>5} "
            f"{'fits':>5} {'ran':>4} {'bytes/tok':>9} {'s':>8} {'out tok/s':>10} {'x first':>8} {'preempt':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        ran = r.seconds > 0
        speed = (f"{r.max_running:>4} {r.kv_bytes_per_token:>9,} {r.seconds:>8.1f} {r.output_tokens_per_s:>10.1f} "
                 f"{r.output_tokens_per_s / base.output_tokens_per_s:>8.2f}" if ran and base.seconds > 0 else
                 f"{'-':>4} {r.kv_bytes_per_token:>9,} {'-':>8} {'-':>10} {r.fits / max(base.fits, 1):>8.2f}")
        lines.append(f"{r.kv_cache_dtype:<15} {r.block_size:>5} {r.num_blocks:>7} {r.token_capacity:>9,} "
                     f"{r.fixed_bytes / 2**20:>9.1f} {r.max_num_seqs:>5} {r.fits:>5} {speed} {r.num_preemptions:>8}")
    lines.append("seqs: max_num_seqs (KIVI: ring slots, chosen so the ring leaves blocks for that many whole "
                 "sequences unless --max-num-seqs is given); fixed: budget outside the blocks (KIVI's ring)"
                 + ("; not run (--count-only): x first compares the sequences that fit" if base.seconds == 0 else ""))
    return "\n".join(lines)


def save_capacity(results: list[CapacityResult], path: Path, settings: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": "kv-capacity", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "settings": settings, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=1))
