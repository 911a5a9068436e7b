"""``kvflow bench specontext --resident-memory GIB``: SpeContext's edge setting — the KV cache's memory capped
(the paper's 4 GB laptop GPU; here RAM, with a file as the offload tier), one long generation.

Four engines generate the same greedy sequence (one prompt of `prompt_len` tokens, up to `max_tokens`
more, EOS ignored), one after the other:

- ``full, capped``: full attention whose KV cache is the cap (`--kv-cache-memory cap`): when its context
  outgrows the cache it ends (finish reason "length"): how far it gets is the longest generation full
  attention completes in that memory;
- ``specontext, capped``: `--kv-resident-memory cap` over a pool that holds the whole sequence; the memory
  model moves the upper layers' older KV to the offload tier as the sequence grows;
- ``specontext`` and ``full``, all in memory: the same without a cap (the first must give the capped
  SpeContext's tokens exactly: the tier changes where KV is read, not what).

With `repeats`, every engine runs once per round in an order rotated between rounds (ratios compare runs
made moments apart on a shared machine) and decode rates are medians. For each: tokens generated, the
finish reason, decode tokens/s, and the KV blocks' memory at its peak:
for the capped SpeContext the memory model's count at every step and the kernel's count of the pool's
pages (mincore) sampled every `sample_every` steps; for the others the blocks held at the peak.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

ENGINES = ("full, capped", "specontext, capped", "specontext", "full")


def _kv_bytes_per_token(model: str, dtype: str) -> int:
    import torch

    from kvflow.config import EngineConfig

    m = EngineConfig.create(model, dtype=dtype).model
    return m.num_layers * 2 * m.num_kv_heads * m.head_dim * torch.empty((), dtype=m.dtype).element_size()


def _generate(llm: Any, prompt: list[int], max_tokens: int, sample_every: int) -> dict[str, Any]:
    """One greedy generation, stepped here: its tokens, finish reason, decode rate and memory samples."""
    from kvflow.sampling_params import SamplingParams

    core = llm.engine.core
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.engine.add_request("edge", {"prompt_token_ids": prompt}, params)
    start = time.perf_counter()
    first: tuple[float, int] | None = None
    model_peak = measured_peak = steps = 0
    tokens: list[int] = []
    finish = None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            tokens = list(out.outputs[0].token_ids)
            finish = out.outputs[0].finish_reason if out.finished else None
        steps += 1
        if first is None and tokens:
            first = (time.perf_counter(), len(tokens))
        if core.residency is not None:
            model_peak = max(model_peak, core.residency.resident_bytes)
            if steps % sample_every == 0:
                measured_peak = max(measured_peak, core.runner.kv_residency.resident_bytes())
    end = time.perf_counter()
    spec = core.runner.kv_spec
    row: dict[str, Any] = {
        "output_tokens": len(tokens), "finish_reason": finish, "seconds": end - start,
        "decode_tok_s": (len(tokens) - first[1]) / max(1e-9, end - first[0]) if first else None,
        "kv_cache_bytes": core.kv.num_blocks * spec.bytes_per_block,
        "peak_held_bytes": core.kv.peak_used_blocks * spec.bytes_per_block, "tokens": tokens,
    }
    if core.residency is not None:
        tier = core.runner.loader.tier
        row.update(peak_model_bytes=model_peak, peak_measured_bytes=measured_peak,
                   end_model_bytes=core.residency.resident_bytes,
                   end_measured_bytes=core.runner.kv_residency.resident_bytes(),
                   over_cap_steps=core.residency.over_cap_steps, offloaded_bytes=core.residency.offloaded_bytes,
                   tier_read_entries=tier.read_tokens, tier_written_bytes=tier.spilled_bytes)
    return row


def run_edge_bench(model: str, dtype: str, prompt_len: int, max_tokens: int, budget: int, cap_gib: float,
                   retrieval_model: str | None = None, spill_dir: str | None = None, sample_every: int = 64,
                   engines: tuple[str, ...] = ENGINES, log: Any = print, block_size: int | None = None,
                   repeats: int = 1) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    import kvflow
    from kvflow.bench.specontext import long_prompts, retrieval_head_for
    from kvflow.model.loader import load_tokenizer

    prompt = long_prompts(load_tokenizer(model), model, 1, prompt_len)[0]
    per_token = _kv_bytes_per_token(model, dtype)
    whole = (prompt_len + max_tokens + 2 * budget + 64) * per_token / 2**30  # a pool for the whole sequence
    results: dict[str, Any] = {"model": model, "dtype": dtype, "prompt_len": prompt_len, "max_tokens": max_tokens,
                               "budget": budget, "cap_bytes": int(cap_gib * 2**30), "kv_bytes_per_token": per_token,
                               "block_size": block_size or 16, "repeats": repeats, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        retrieval, trained = retrieval_head_for(model, retrieval_model, Path(tmp))
        results["retrieval_model"] = retrieval if trained else "random weights (costs only)"
        sparse = {"kv_policy": "specontext", "kv_budget": budget, "retrieval_model": retrieval}
        settings = {
            "full, capped": {"kv_cache_memory": cap_gib},
            "specontext, capped": {**sparse, "kv_cache_memory": whole, "kv_resident_memory": cap_gib,
                                   "kv_spill_dir": spill_dir},
            "specontext": {**sparse, "kv_cache_memory": whole},
            "full": {"kv_cache_memory": whole},
        }
        llms = {name: kvflow.LLM(model=model, dtype=dtype, enable_prefix_caching=False, max_num_seqs=1,
                                 block_size=block_size, **settings[name]) for name in engines}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
        for r in range(repeats):  # every engine once per round, the order rotated: ratios of runs moments apart
            for name in engines[r % len(engines):] + engines[: r % len(engines)]:
                run = _generate(llms[name], prompt, max_tokens, sample_every)
                runs[name].append(run)
                log(f"{name}: {run['output_tokens']} tokens ({run['finish_reason']}), "
                    f"{run['decode_tok_s'] or 0:.1f} decode tok/s")
        for llm in llms.values():
            llm.close()
        for name in engines:
            row = {"engine": name, **runs[name][0]}
            rates = [x["decode_tok_s"] for x in runs[name] if x["decode_tok_s"] is not None]
            row["decode_tok_s"] = statistics.median(rates) if rates else None
            row["decode_tok_s_runs"] = rates
            for key in ("peak_model_bytes", "peak_measured_bytes", "peak_held_bytes"):
                if key in row:
                    row[key] = max(x[key] for x in runs[name])
            results["runs"].append(row)
    tokens = {r["engine"]: r.pop("tokens") for r in results["runs"]}
    if "specontext, capped" in tokens and "specontext" in tokens:
        results["capped_tokens_equal_uncapped"] = tokens["specontext, capped"] == tokens["specontext"]
    return results


def format_edge_report(results: dict[str, Any]) -> str:
    mib = 2**20
    lines = [f"{results['model']} ({results['dtype']}): a {results['prompt_len']}-token prompt, up to "
             f"{results['max_tokens']} tokens generated, budget {results['budget']}; KV memory capped at "
             f"{results['cap_bytes'] / mib:.1f} MiB ({results['kv_bytes_per_token']} bytes per token in every layer, "
             f"blocks of {results.get('block_size', 16)} tokens); "
             f"retrieval head: {results['retrieval_model']}",
             f"{'engine':<20} {'tokens':>7} {'finish':>7} {'decode tok/s':>12} {'vs full':>8} {'KV peak MiB':>12} "
             f"{'measured':>9}"]
    full = next((r["decode_tok_s"] for r in results["runs"] if r["engine"] == "full"), None)
    for r in results["runs"]:
        peak = r.get("peak_model_bytes", r["peak_held_bytes"])
        measured = f"{r['peak_measured_bytes'] / mib:.1f}" if "peak_measured_bytes" in r else ""
        vs = f"{r['decode_tok_s'] / full:.2f}x" if full and r["decode_tok_s"] else ""
        lines.append(f"{r['engine']:<20} {r['output_tokens']:>7} {str(r['finish_reason']):>7} "
                     f"{r['decode_tok_s'] or 0:>12.1f} {vs:>8} {peak / mib:>12.1f} {measured:>9}")
    if "capped_tokens_equal_uncapped" in results:
        lines.append(f"capped SpeContext's tokens equal the uncapped one's: {results['capped_tokens_equal_uncapped']}")
    return "\n".join(lines)
