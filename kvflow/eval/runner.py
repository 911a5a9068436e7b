"""`run_eval(llm, EvalConfig) -> EvalResult`: every task of the quality harness on one engine.

The engine is built by the caller, so a sweep over engine settings ("accuracy vs KV budget")
is a loop that builds one `LLM` per setting and calls `run_eval` with the same config: the
prompts depend only on the config (seed, grid, corpus split), never on the engine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvflow.eval.agreement import draft_agreement
from kvflow.eval.data import CorpusSplit, resolve_split, token_stream, unigram_counts
from kvflow.eval.kv_budget import KVBudgetRule, budget_rule, check_fraction
from kvflow.eval.perplexity import engine_score_fn, evaluate_perplexity, make_windows
from kvflow.eval.retrieval import engine_generate_fn, run_multikey, run_passkey
from kvflow.train.synthetic import RetrievalTasks

TASKS = ("perplexity", "passkey", "multikey")


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    # passkey grid (and multikey lengths unless `multikey_lengths` is given)
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 10  # passkey samples per cell; multikey contexts per cell
    pairs: tuple[int, ...] = (1, 2, 4, 8, 16)
    multikey_lengths: tuple[int, ...] | None = None
    queries: int = 4  # multikey queries per context
    ppl_context: int | None = None  # tokens per window, BOS included; None: min(1024, max_model_len - 1)
    ppl_tokens: int = 65536  # held-out tokens scored
    draft_tokens: int = 16384  # held-out positions for draft-vs-teacher agreement
    unigram: bool = True
    heldout_percent: int | None = None  # None: the model's train_report.json, else 3
    max_source_files: int | None = None  # None: the model's train_report.json, else all; 0: all
    seed: int = 0
    # Each request's kv_budget = max(floor, round(fraction * its prompt tokens)) under the engine's
    # KV policy (kv_budget.py); None: requests use the engine's own kv_budget.
    kv_budget_fraction: float | None = None
    cache_dir: str | None = None  # caches the train split's unigram counts
    progress: bool = False

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(TASKS)}; got {list(self.tasks)}")
        if self.trials < 1 or self.queries < 1:
            raise ValueError(f"trials and queries must be >= 1, got {self.trials} and {self.queries}")
        if any(d < 0 or d > 1 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {list(self.depths)}")
        for name in ("lengths", "pairs"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {list(getattr(self, name))}")
        if self.ppl_tokens < 1:
            raise ValueError(f"ppl_tokens must be >= 1, got {self.ppl_tokens}")
        if self.kv_budget_fraction is not None:
            check_fraction(self.kv_budget_fraction)


@dataclass
class EvalResult:
    model: str
    engine: dict[str, Any]
    config: dict[str, Any]
    corpus: dict[str, Any]
    perplexity: dict[str, Any] | None = None
    passkey: dict[str, Any] | None = None
    multikey: dict[str, Any] | None = None
    draft: dict[str, Any] | None = None
    # With kv_budget_fraction: the rule (policy, fraction, floor) and the share of each task's prompt
    # tokens the budgets kept.
    kv_budget: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not samples:
            for task in ("passkey", "multikey"):
                if out[task] is not None:
                    out[task].pop("samples", None)
        return out


def engine_settings(llm: Any) -> dict[str, Any]:
    """Everything that can change the numbers: model, dtype, context, cache and scheduler knobs."""
    config = llm.engine.config
    out: dict[str, Any] = {
        "model": config.model.path,
        "architecture": config.model.architecture,
        "dtype": str(config.model.dtype).removeprefix("torch."),
        "max_model_len": config.model.max_model_len,
        "device": config.device,
        "seed": config.seed,
    }
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name != "model" and dataclasses.is_dataclass(value):
            out[f.name] = dataclasses.asdict(value)
    kv = getattr(getattr(llm.engine, "core", None), "kv", None)
    if kv is not None and hasattr(kv, "num_blocks"):
        out["num_kv_blocks"] = int(kv.num_blocks)
    return out


def run_eval(llm: Any, config: EvalConfig = EvalConfig(), log: Callable[[str], None] | None = None,
             draft_llm: Any | None = None) -> EvalResult:
    """Run the configured tasks through `llm` (a `kvflow.LLM`); with `draft_llm`, also its agreement."""
    say = log or (lambda _msg: None)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("evaluation needs the model's tokenizer; this model directory has none")
    model_cfg = llm.engine.config.model
    max_len = model_cfg.max_model_len
    rule = None if config.kv_budget_fraction is None else budget_rule(llm.engine.config.cache,
                                                                       config.kv_budget_fraction)
    budget = None if rule is None else rule.budget
    split = resolve_split(model_cfg.path, config.heldout_percent, config.max_source_files)
    started = time.perf_counter()
    train_docs, heldout_docs = split.documents()
    heldout = token_stream(tokenizer, heldout_docs)
    result = EvalResult(
        model=model_cfg.path, engine=engine_settings(llm), config=dataclasses.asdict(config),
        corpus=_corpus_info(split, train_docs, heldout_docs, heldout),
    )
    result.seconds["corpus"] = time.perf_counter() - started
    windows_lengths: list[int] = []
    say(f"held-out corpus: {len(heldout_docs)} documents, {len(heldout):,} tokens (split: {split.source})")
    if rule is not None:
        say(f"kv policy {rule.policy}: each request keeps max({rule.floor}, round({rule.fraction:g} x prompt tokens))")

    if "perplexity" in config.tasks:
        started = time.perf_counter()
        context = config.ppl_context or min(1024, max_len - 1)
        if not 2 <= context <= max_len - 1:
            raise ValueError(f"ppl_context must be in [2, {max_len - 1}] (max_model_len - 1), got {context}")
        counts = None
        if config.unigram:
            say(f"unigram baseline: counting tokens of {len(train_docs)} train documents")
            counts = unigram_counts(tokenizer, train_docs, config.cache_dir,
                                    cache_key=f"{split.heldout_percent}|{split.max_source_files}")
        windows = make_windows(heldout, context, config.ppl_tokens, _bos(tokenizer))
        windows_lengths = [len(w) for w in windows]
        say(f"perplexity: {sum(len(w) - 1 for w in windows):,} tokens in {len(windows)} windows of <= {context}")
        result.perplexity = evaluate_perplexity(engine_score_fn(llm, config.progress, budget), windows, tokenizer,
                                                counts)
        result.seconds["perplexity"] = time.perf_counter() - started

    if "passkey" in config.tasks or "multikey" in config.tasks:
        tasks = RetrievalTasks(tokenizer, filler=heldout)
        if tasks.bos is None:  # e.g. Qwen: no BOS token; start prompts with the document separator
            tasks.bos = tokenizer.eos_token_id
        generate = engine_generate_fn(llm, config.progress, budget)
        if "passkey" in config.tasks:
            started = time.perf_counter()
            say(f"passkey: {len(config.lengths)} lengths x {len(config.depths)} depths x {config.trials} trials")
            result.passkey = run_passkey(tasks, generate, config.lengths, config.depths, config.trials,
                                         max_len, config.seed)
            result.seconds["passkey"] = time.perf_counter() - started
        if "multikey" in config.tasks:
            started = time.perf_counter()
            lengths = config.multikey_lengths or config.lengths
            say(f"multikey: {len(lengths)} lengths x {len(config.pairs)} pair counts x {config.trials} contexts "
                f"x {config.queries} queries")
            result.multikey = run_multikey(tasks, generate, lengths, config.pairs, config.trials, config.queries,
                                           max_len, config.seed)
            result.seconds["multikey"] = time.perf_counter() - started

    if draft_llm is not None:
        started = time.perf_counter()
        context = min(512, max_len - 1, draft_llm.engine.config.model.max_model_len - 1)
        windows = make_windows(heldout, context, config.draft_tokens, _bos(tokenizer))
        say(f"draft agreement: {sum(len(w) - 1 for w in windows):,} positions")
        result.draft = draft_agreement(llm, draft_llm, windows)
        result.seconds["draft"] = time.perf_counter() - started
    if rule is not None:
        result.kv_budget = _budget_info(rule, result, windows_lengths)
    return result


def _budget_info(rule: KVBudgetRule, result: EvalResult, ppl_lengths: list[int]) -> dict[str, Any]:
    """The rule and, per task, the share of prompt tokens kept: at short prompts the floor keeps more
    than the fraction, so this is the number to read next to the accuracy."""
    kept = {"perplexity": rule.kept_share(ppl_lengths) if result.perplexity is not None else None}
    for task in ("passkey", "multikey"):
        grid = getattr(result, task)
        kept[task] = None if grid is None else rule.kept_share(s["prompt_tokens"] for s in grid["samples"])
    return {**rule.to_dict(), "kept_share": kept}


def _bos(tokenizer: Any) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


def _corpus_info(split: CorpusSplit, train_docs: list, heldout_docs: list, heldout: np.ndarray) -> dict[str, Any]:
    return {
        "heldout_percent": split.heldout_percent,
        "max_source_files": split.max_source_files,
        "split_source": split.source,
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "heldout_tokens": len(heldout),
    }
