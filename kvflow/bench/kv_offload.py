"""`kvflow bench kv-offload`: where loading a prefix from an offload tier beats recomputing it, and the
first requests' TTFT after a restart with and without the file tier.

Break-even. For each tier and prefix length L, the same engine times (max_tokens 1, so the time is
the TTFT) a prompt of L + 1 tokens nobody has seen (every token computed: *recompute*), then, once its
blocks are written to the tier and the working pool's cached prefixes are dropped
(`LLM.reset_prefix_cache`), the same prompt again (L tokens loaded, one computed: *load*). The tiers:

* `file-direct`  the file tier with O_DIRECT: every load reads the SSD;
* `file-cached`  buffered I/O, the files still in the page cache (what recent blocks cost);
* `file-cold`    buffered I/O after the files are dropped from the page cache (posix_fadvise);
* `host`         the host-memory tier alone.

Loads are forced (`kv_offload_load always`) so both sides are measured at every length; the engine's
own performance model (kvflow/kv_transfer/offload/cost_model.py) is reported beside the measured
break-even, with the estimates it had learned by the end of the run.

Restart. One process computes N prompts with the file tier on and exits (a graceful stop writes
what is staged); a fresh process then sends the same prompts, one at a time, with the tier (they are
loaded) and another without it (they are recomputed).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TIERS = ("file-direct", "file-cached", "file-cold", "host")
DEFAULT_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class OffloadBenchConfig:
    model: str
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    tiers: tuple[str, ...] = TIERS
    repeats: int = 3
    dtype: str = "auto"
    block_size: int = 16
    threads: int | None = None
    restart_prompts: int = 8  # 0: skip the restart measurement
    restart_len: int = 2048
    offload_dir: str | None = None  # default: a temporary folder (removed afterwards)
    out_dir: str | None = "bench_results/kv_offload"
    seed: int = 0

    def validate(self) -> None:
        unknown = set(self.tiers) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tier {sorted(unknown)}; choose from {', '.join(TIERS)}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("prefix lengths must be >= 1")
        if self.repeats < 1 or self.restart_prompts < 0 or self.restart_len < 1:
            raise ValueError("--repeats must be >= 1, --restart-prompts >= 0 and --restart-len >= 1")


def _engine_args(cfg: OffloadBenchConfig, max_len: int) -> dict[str, Any]:
    """The engine's settings (and the process's torch threads) for prompts of up to `max_len` tokens."""
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    return dict(dtype=cfg.dtype, block_size=cfg.block_size, max_model_len=max_len + 8,
                max_num_batched_tokens=max(2048, max_len + 8))


def _tier_args(tier: str, folder: str) -> dict[str, Any]:
    if tier == "host":
        return dict(kv_offload_host_size=4.0)
    io = "direct" if tier == "file-direct" else "buffered"
    return dict(kv_offload_dir=folder, kv_offload_io=io)


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def _ttft(llm: Any, prompt: list[int]) -> float:
    from kvflow import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return time.perf_counter() - started


def _wait_for_writes(llm: Any, timeout: float = 120.0) -> None:
    connector = llm.engine.core.connector
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connector.collect()
        if connector.stats_snapshot().write_queue_bytes == 0:
            return
        time.sleep(0.005)
    raise TimeoutError("the offload writer did not catch up")


def _drop_page_cache(folder: str) -> None:
    for path in Path(folder).rglob("*.kvchunk"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def break_even(cfg: OffloadBenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per tier: recompute and load TTFT for every prefix length (medians over the repeats)."""
    from kvflow import LLM

    rows = []
    for tier in cfg.tiers:
        with tempfile.TemporaryDirectory(dir=cfg.offload_dir) as folder:
            llm = LLM(model=cfg.model, kv_offload_load="always", **_engine_args(cfg, max(cfg.lengths)),
                      **_tier_args(tier, folder))
            vocab = llm.engine.config.model.vocab_size
            rng = random.Random(cfg.seed)
            _ttft(llm, _prompt(rng, 64, vocab))  # warm-up: kernels, thread pools
            for length in cfg.lengths:
                recompute, load = [], []
                for _ in range(cfg.repeats):
                    prompt = _prompt(rng, length + 1, vocab)
                    recompute.append(_ttft(llm, prompt))
                    _wait_for_writes(llm)
                    llm.reset_prefix_cache()
                    if tier == "file-cold":
                        _drop_page_cache(folder)
                    load.append(_ttft(llm, prompt))
                row = {"tier": tier, "prefix_tokens": length, "recompute_s": statistics.median(recompute),
                       "load_s": statistics.median(load)}
                row["speedup"] = row["recompute_s"] / row["load_s"]
                rows.append(row)
                log(f"{tier:12s} {length:6d} tokens: recompute {row['recompute_s'] * 1e3:8.1f} ms, load "
                    f"{row['load_s'] * 1e3:8.1f} ms ({row['speedup']:.2f}x)")
            connector = llm.engine.core.connector
            model_tier = "host" if tier == "host" else "file"
            predicted = connector.cost.break_even_blocks(model_tier)
            stats = connector.stats_snapshot()
            staged_tokens = max(1, sum(t.blocks_written for t in stats.tiers[-1:]) * cfg.block_size)
            for row in rows:
                if row["tier"] == tier:
                    row["model_break_even_tokens"] = None if predicted is None else predicted * cfg.block_size
                    row["loaded_blocks"] = stats.loaded_blocks
                    # The engine thread's share of the write path: copying completed blocks out.
                    row["stage_ms_per_1k_tokens"] = stats.stage_seconds * 1e3 / staged_tokens * 1000
            llm.close()
    return rows


def measured_break_even(rows: list[dict[str, Any]], tier: str) -> int | None:
    """The shortest measured prefix from which on loading is faster at every longer length."""
    points = sorted((r["prefix_tokens"], r["load_s"] < r["recompute_s"]) for r in rows if r["tier"] == tier)
    best = None
    for length, faster in reversed(points):
        if not faster:
            break
        best = length
    return best


# ------------------------------------------------------------------ restart
def _restart_worker(cfg_dict: dict[str, Any], folder: str | None, mode: str, queue: Any) -> None:
    """One engine process: `fill` computes the prompts with the file tier; `time` sends them again."""
    from kvflow import LLM

    cfg = OffloadBenchConfig(**cfg_dict)
    tier = {} if folder is None else dict(kv_offload_dir=folder, kv_offload_io="direct")
    llm = LLM(model=cfg.model, **_engine_args(cfg, cfg.restart_len), **tier)
    rng = random.Random(cfg.seed + 1)
    vocab = llm.engine.config.model.vocab_size
    prompts = [_prompt(rng, cfg.restart_len, vocab) for _ in range(cfg.restart_prompts)]
    _ttft(llm, _prompt(random.Random(-1), 64, vocab))  # warm-up with a prompt of its own
    times = [_ttft(llm, prompt) for prompt in prompts]
    if folder is not None and mode == "fill":
        _wait_for_writes(llm)
    llm.close()
    stats = llm.engine.stats().kv_offload
    queue.put({"ttft_s": times, "loaded_blocks": 0 if stats is None else stats.loaded_blocks})


def _run_process(cfg: OffloadBenchConfig, folder: str | None, mode: str) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_restart_worker, args=(asdict(cfg), folder, mode, queue))
    process.start()
    result = queue.get(timeout=3600)
    process.join(timeout=60)
    return result


def restart(cfg: OffloadBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=cfg.offload_dir) as folder:
        filled = _run_process(cfg, folder, "fill")
        with_tier = _run_process(cfg, folder, "time")
    without = _run_process(cfg, None, "time")
    out = {"prompts": cfg.restart_prompts, "prompt_tokens": cfg.restart_len,
           "first_run_ttft_s": filled["ttft_s"], "with_tier_ttft_s": with_tier["ttft_s"],
           "without_tier_ttft_s": without["ttft_s"], "loaded_blocks": with_tier["loaded_blocks"]}
    for key in ("with_tier_ttft_s", "without_tier_ttft_s"):
        values = out[key]
        log(f"restart, {key.removesuffix('_ttft_s').replace('_', ' ')}: TTFT median "
            f"{statistics.median(values) * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms")
    return out


# ------------------------------------------------------------------- report
@dataclass
class OffloadBenchResult:
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    break_even_tokens: dict[str, int | None] = field(default_factory=dict)
    restart: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=dict)


def run(cfg: OffloadBenchConfig, log: Callable[[str], None] = print) -> OffloadBenchResult:
    cfg.validate()
    result = OffloadBenchResult(config=asdict(cfg), machine={"cpus": os.cpu_count(),
                                                              "when": datetime.now(UTC).isoformat()})
    result.rows = break_even(cfg, log)
    result.break_even_tokens = {tier: measured_break_even(result.rows, tier) for tier in cfg.tiers}
    if cfg.restart_prompts:
        result.restart = restart(cfg, log)
    return result


def format_table(result: OffloadBenchResult) -> str:
    lines = [f"{'tier':12s} {'prefix':>7s} {'recompute ms':>13s} {'load ms':>9s} {'speedup':>8s}"]
    for row in result.rows:
        lines.append(f"{row['tier']:12s} {row['prefix_tokens']:7d} {row['recompute_s'] * 1e3:13.1f} "
                     f"{row['load_s'] * 1e3:9.1f} {row['speedup']:7.2f}x")
    for tier, tokens in result.break_even_tokens.items():
        row = next((r for r in result.rows if r["tier"] == tier), {})
        model = row.get("model_break_even_tokens")
        shortest = min((r["prefix_tokens"] for r in result.rows if r["tier"] == tier), default=0)
        measured = "-" if tokens is None else (f"<= {tokens}" if tokens == shortest else str(tokens))
        lines.append(f"break-even {tier}: measured {measured} tokens, the engine's model "
                     f"{model if model is not None else '-'} tokens; staging copy "
                     f"{row.get('stage_ms_per_1k_tokens', 0):.2f} ms per 1k tokens written")
    if result.restart:
        r = result.restart
        lines.append(f"restart ({r['prompts']} prompts of {r['prompt_tokens']} tokens): TTFT median with the file "
                     f"tier {statistics.median(r['with_tier_ttft_s']) * 1e3:.1f} ms, without "
                     f"{statistics.median(r['without_tier_ttft_s']) * 1e3:.1f} ms")
    return "\n".join(lines)


def save(result: OffloadBenchResult, out_dir: str) -> list[Path]:
    """The JSON result and a plot of TTFT against prefix length per tier."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = "kv_offload_" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(asdict(result), indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tier in dict.fromkeys(r["tier"] for r in result.rows):
        rows = [r for r in result.rows if r["tier"] == tier]
        ax.plot([r["prefix_tokens"] for r in rows], [r["load_s"] * 1e3 for r in rows], marker="o",
                label=f"load ({tier})")
    first = [r for r in result.rows if r["tier"] == result.rows[0]["tier"]]
    ax.plot([r["prefix_tokens"] for r in first], [r["recompute_s"] * 1e3 for r in first], marker="s",
            color="black", label="recompute")
    ax.set(xscale="log", yscale="log", xlabel="prefix tokens", ylabel="TTFT (ms)",
           title="KV offload: load from a tier vs recompute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    png = folder / f"{stem}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path, png]
