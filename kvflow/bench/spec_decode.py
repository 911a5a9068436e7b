"""``kvflow bench spec-decode``: what speculative decoding buys, and what one verification step costs.

Throughput (`run_spec_bench`): one engine per configuration (``none``, and each method at each K),
greedy decoding of exactly ``max_tokens`` tokens per prompt (EOS ignored, no prefix cache), at each
batch size. Every repeat runs every configuration once, in an order rotated from repeat to repeat,
so a ratio to ``none`` compares runs made moments apart on the same machine; each figure is the
median over repeats. Acceptance comes from the engine's own counters (`EngineStats.spec_*`): the
acceptance rate is accepted / proposed tokens, the mean accepted length the tokens one verification
step emits (accepted proposals per verification + 1). Greedy speculation must give exactly the
``none`` run's tokens; the report says whether it did.

Workloads, built from text every Python installation ships (nothing is downloaded):
  code  held-out CPython standard-library modules (the trainer's split, never trained on), each cut
        after a ``def`` line: complete the function.
  edit  a function from a held-out module, then a comment asking for it rewritten and the first line
        of the rewrite: the output copies much of the prompt, what prompt lookup (``ngram``) is for.

Verification cost (`measure_verify_cost`): on one engine, steps whose every request verifies K
proposals are timed against plain decode steps (K = 0) at about the same context length. The
proposals are set on each request before the step and the proposer is switched off, so every step
verifies exactly K and only the step is timed: the forward over K + 1 positions per request, the
logits and rejection sampling. The ratio is the mean accepted length speculation needs just to
break even.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKLOADS = ("code", "edit")
METHODS = ("none", "ngram", "draft")
_EDIT_HEADER = "\n\n# The same function, rewritten with clearer names and the same behaviour:\n"


@dataclass(frozen=True)
class SpecConfig:
    method: str  # "none", "ngram" or "draft"
    k: int  # proposals per step (0 for none)

    @property
    def label(self) -> str:
        return "none" if self.method == "none" else f"{self.method} K={self.k}"


def heldout_python(model: str | Path) -> list[str]:
    """The held-out standard-library modules of the model's training split (`kvflow.train.corpus`),
    sorted by name; the shipped `tiny`'s split (3% of every module) when the model has no report."""
    from kvflow.train.corpus import cpython_documents, split_documents

    percent, files = 3, None
    report = Path(model) / "train_report.json"
    if report.is_file():
        preset = json.loads(report.read_text()).get("preset", {})
        percent, files = int(preset.get("heldout_percent", 3)), preset.get("max_source_files")
    _, heldout = split_documents(cpython_documents(files), percent)
    return [d.text for d in heldout if d.name.endswith(".py")]


def _functions(text: str) -> list[tuple[int, int, int]]:
    """(start, end of the def line, end of the function) offsets of each ``def`` with a body."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    out = []
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped.startswith("def ") or not line.rstrip().endswith(":"):
            continue
        indent = len(line) - len(stripped)
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        if j - i >= 4:
            out.append((offsets[i], offsets[i + 1], offsets[j]))
    return out


def make_workload(tokenizer: Any, texts: list[str], workload: str, num_prompts: int, prompt_len: int,
                  max_tokens: int) -> list[list[int]]:
    """`num_prompts` prompts of at most `prompt_len` tokens, the same on every run (see the module doc):
    one function per module in turn, then each module's next function, and so on."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    per_module = [_functions(t) for t in texts]
    prompts: list[list[int]] = []
    for rank in range(max((len(f) for f in per_module), default=0)):
        for text, functions in zip(texts, per_module):
            if rank >= len(functions) or len(prompts) == num_prompts:
                continue
            start, def_end, end = functions[rank]
            if workload == "code":
                ids = encode(text[max(0, def_end - 8 * prompt_len):def_end])
                if len(ids) >= prompt_len // 2:  # enough of the module before it
                    prompts.append(ids[-prompt_len:])
                continue
            body = encode(text[start:end])
            room = prompt_len - len(encode(_EDIT_HEADER + text[start:def_end])) - 1
            if len(body) < min(max_tokens, room):
                continue  # too short for the output to copy it
            original = tokenizer.decode(body[:room])
            prompts.append(encode(original + _EDIT_HEADER + text[start:def_end]))
    if len(prompts) < num_prompts:
        raise ValueError(f"the held-out modules give only {len(prompts)} {workload} prompts, not {num_prompts}")
    return prompts


def engine_kwargs(config: SpecConfig, speculative_model: str | None = None, prompt_lookup_min: int = 1,
                  prompt_lookup_max: int = 4) -> dict[str, Any]:
    """The engine arguments of one configuration (the same flags `kvflow serve` takes)."""
    if config.method == "none":
        return {}
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    args: dict[str, Any] = {"speculative_method": config.method, "num_speculative_tokens": config.k}
    if config.method == "ngram":
        args.update(prompt_lookup_min=prompt_lookup_min, prompt_lookup_max=prompt_lookup_max)
    else:
        args["speculative_model"] = speculative_model
    return args


def _count(batch: int, num_prompts: int) -> int:
    """Prompts a run at `batch` covers: at least `num_prompts`, in whole groups of `batch`."""
    return batch * max(1, -(-num_prompts // batch))


def _run(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """One timed generate; what the engine's speculative counters and step count moved by."""
    from kvflow.sampling_params import SamplingParams

    core = llm.engine.core
    before, steps = core.stats(), core.num_steps
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    seconds = time.perf_counter() - start
    after = core.stats()
    per_pos = [a - (before.spec_accepted_per_position[j] if j < len(before.spec_accepted_per_position) else 0)
               for j, a in enumerate(after.spec_accepted_per_position)]
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return {"seconds": seconds, "tokens": tokens, "steps": core.num_steps - steps,
            "drafts": after.spec_num_drafts - before.spec_num_drafts,
            "draft_tokens": after.spec_num_draft_tokens - before.spec_num_draft_tokens,
            "accepted": after.spec_num_accepted_tokens - before.spec_num_accepted_tokens, "per_pos": per_pos}


def run_spec_bench(model: str, dtype: str = "float32", workload: str = "code", methods: tuple[str, ...] = METHODS,
                   ks: tuple[int, ...] = (2, 4, 6), batches: tuple[int, ...] = (1,), max_tokens: int = 128,
                   prompt_len: int = 256, repeats: int = 3, num_prompts: int = 8, speculative_model: str | None = None,
                   prompt_lookup_min: int = 1, prompt_lookup_max: int = 4,
                   engine_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every configuration at every batch size, `repeats` interleaved rounds (see the module doc)."""
    from kvflow.llm import LLM

    configs = [SpecConfig(m, 0 if m == "none" else k) for m in dict.fromkeys(methods) for k in
               ((0,) if m == "none" else ks)]
    texts = heldout_python(model)
    max_batch = max(batches)
    block = 16
    num_blocks = max_batch * -(-(prompt_len + max_tokens + max(ks) + 1) // block) + 8
    base = dict(dtype=dtype, enable_prefix_caching=False, max_num_seqs=max_batch, num_blocks=num_blocks,
                block_size=block, **(engine_extra or {}))
    engines = {c: LLM(model=model, **base, **engine_kwargs(c, speculative_model, prompt_lookup_min,
                                                           prompt_lookup_max)) for c in configs}
    tokenizer = next(iter(engines.values())).get_tokenizer()
    prompts = make_workload(tokenizer, texts, workload, max(_count(b, num_prompts) for b in batches), prompt_len,
                            max_tokens)
    for llm in engines.values():  # warm-up: first-call costs out of the timed runs
        _run(llm, prompts[:1], 4)
    runs: dict[tuple[SpecConfig, int], list[dict[str, Any]]] = {(c, b): [] for c in configs for b in batches}
    for r in range(repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for b in batches:
            for c in order:
                groups = [_run(engines[c], prompts[i:i + b], max_tokens) for i in range(0, _count(b, num_prompts), b)]
                run = {key: sum(g[key] for g in groups) for key in ("seconds", "steps", "drafts", "draft_tokens",
                                                                    "accepted")}
                run["tokens"] = [t for g in groups for t in g["tokens"]]
                run["per_pos"] = [sum(col) for col in zip(*(g["per_pos"] + [0] * (c.k - len(g["per_pos"]))
                                                             for g in groups))]
                runs[c, b].append(run)
    results = []
    for b in batches:
        plain = runs.get((SpecConfig("none", 0), b))
        for c in configs:
            rs = runs[c, b]
            n = _count(b, num_prompts)
            tps = [n * max_tokens / x["seconds"] for x in rs]
            drafts, proposed, accepted = (sum(x[key] for x in rs) for key in ("drafts", "draft_tokens", "accepted"))
            per_pos = [sum(col) for col in zip(*(x["per_pos"] for x in rs))]
            mismatched = None if plain is None else sum(
                got != want for x, p in zip(rs, plain) for got, want in zip(x["tokens"], p["tokens"]))
            results.append({
                "method": c.method, "k": c.k, "batch": b, "output_tokens_per_s": statistics.median(tps),
                "ratio_to_none": None if plain is None else statistics.median(
                    p["seconds"] / x["seconds"] for x, p in zip(rs, plain)),
                "acceptance_rate": accepted / proposed if proposed else None,
                "mean_accepted_length": 1 + accepted / drafts if drafts else None,
                "accepted_per_position": [a / drafts for a in per_pos] if drafts else [],
                "verified_step_fraction": drafts / (n * max_tokens * len(rs) - accepted) if c.k else None,
                "steps": statistics.median(x["steps"] for x in rs), "tokens_per_s_runs": tps,
                "outputs_equal_none": None if plain is None else mismatched == 0,
                "mismatched_sequences": mismatched,
            })
    settings = dict(model=str(model), dtype=dtype, workload=workload, methods=list(methods), ks=list(ks),
                    batches=list(batches), max_tokens=max_tokens, prompt_len=prompt_len, repeats=repeats,
                    speculative_model=speculative_model, prompt_lookup_min=prompt_lookup_min,
                    prompt_lookup_max=prompt_lookup_max, num_prompts=num_prompts,
                    prompts_per_run={b: _count(b, num_prompts) for b in batches},
                    mean_prompt_len=statistics.mean(len(p) for p in prompts))
    checked = [r["outputs_equal_none"] for r in results if r["method"] != "none"
               and r["outputs_equal_none"] is not None]
    return {"settings": settings, "results": results, "outputs_equal": all(checked) if checked else None}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_spec_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    per_run = ", ".join(f"{n} at batch {b}" for b, n in s["prompts_per_run"].items())
    lines = [f"{s['workload']} workload, prompts of ~{s['mean_prompt_len']:.0f} tokens ({per_run}), "
             f"{s['max_tokens']} greedy tokens each, {s['repeats']} interleaved repeats (medians)",
             f"{'config':<12} {'batch':>5} {'tok/s':>9} {'vs none':>8} {'accept':>7} {'mean len':>8} "
             f"{'outputs':>8}  accepted per position"]
    for r in report["results"]:
        label = SpecConfig(r["method"], r["k"]).label
        same = {None: "-", True: "same", False: f"{r['mismatched_sequences']} DIFF"}[r["outputs_equal_none"]]
        per_pos = " ".join(f"{p:.2f}" for p in r["accepted_per_position"])
        lines.append(f"{label:<12} {r['batch']:>5} {r['output_tokens_per_s']:>9.1f} "
                     f"{_fmt(r['ratio_to_none'], '.2f') + 'x':>8} {_fmt(r['acceptance_rate'], '.2f'):>7} "
                     f"{_fmt(r['mean_accepted_length'], '.2f'):>8} {same:>8}  {per_pos}")
    verdict = {None: "not checked (no `none` run)", True: "every speculative run gave the `none` run's tokens",
               False: "SOME SPECULATIVE RUNS DIFFER FROM `none` (greedy should give the same tokens)"}
    lines.append(f"greedy outputs: {verdict[report['outputs_equal']]}")
    return "\n".join(lines)


def measure_verify_cost(model: str, dtype: str = "bfloat16", ks: tuple[int, ...] = (2, 4, 6),
                        batches: tuple[int, ...] = (1,), context_len: int = 512, steps: int = 10,
                        repeats: int = 3, engine_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median seconds of a step verifying K proposals per request, against a decode step (K = 0)."""
    import numpy as np

    from kvflow.llm import LLM
    from kvflow.sampling_params import SamplingParams

    top = max(ks)
    budget = repeats * steps * sum(k + 1 for k in (0, *ks)) + top + 1  # the most tokens a request emits
    per_seq = context_len + budget + top + 1
    rows = []
    for b in batches:
        llm = LLM(model=model, dtype=dtype, enable_prefix_caching=False, max_num_seqs=b, speculative_method="ngram",
                  num_speculative_tokens=top, max_model_len=per_seq, num_blocks=b * -(-per_seq // 16) + 8,
                  block_size=16, **(engine_extra or {}))
        engine = llm.engine
        engine.core.runner.proposer = None  # the proposals are set below: the step alone is timed
        vocab = engine.core.runner.model_config.vocab_size
        rng = np.random.default_rng(0)
        params = SamplingParams(max_tokens=budget, temperature=0.0, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"v{i}", {"prompt_token_ids": rng.integers(100, vocab - 100, context_len).tolist()},
                               params)
        running = engine.core.scheduler.running
        while engine.core.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in running):
            engine.step()  # the prompts
        times: dict[int, list[float]] = {k: [] for k in (0, *ks)}
        verified = dict.fromkeys(times, 0)
        for _ in range(repeats * steps):  # one step of each K in turn: drift in the machine hits them alike
            for k in times:
                for request in running:
                    request.spec_token_ids = [request.all_token_ids[-1]] * k
                before = engine.core.stats().spec_num_draft_tokens
                start = time.perf_counter()
                engine.step()
                times[k].append(time.perf_counter() - start)
                verified[k] += engine.core.stats().spec_num_draft_tokens - before
        base = statistics.median(times[0])
        for k in times:
            t = statistics.median(times[k])
            rows.append({"batch": b, "k": k, "positions": k + 1, "step_ms": 1e3 * t, "ratio_to_decode": t / base,
                         "verified_per_step": verified[k] / (repeats * steps * b)})
        del llm, engine
    return {"settings": dict(model=str(model), dtype=dtype, ks=list(ks), batches=list(batches),
                             context_len=context_len, steps=steps, repeats=repeats), "results": rows}


def format_verify_cost(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"one step at ~{s['context_len']} tokens of context ({s['dtype']}), median of {s['steps']} x "
             f"{s['repeats']} steps of each K, interleaved; the ratio is the mean accepted length needed to break even",
             f"{'batch':>5} {'K':>3} {'positions':>9} {'step ms':>9} {'vs decode':>9} {'verified/seq':>12}"]
    for r in report["results"]:
        lines.append(f"{r['batch']:>5} {r['k']:>3} {r['positions']:>9} {r['step_ms']:>9.2f} "
                     f"{r['ratio_to_decode']:>8.2f}x {r['verified_per_step']:>12.2f}")
    return "\n".join(lines)


def save_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
