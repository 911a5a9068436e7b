"""Passkey (needle in a haystack) and multi-key associative recall accuracy grids.

Samples come from `kvflow.train.synthetic.RetrievalTasks` (the same templates the model was
trained on) with held-out text as filler. Every cell draws its samples from its own seed
(`seed`, task, length, depth or pairs), so a cell's prompts do not depend on the rest of the grid
and two runs that differ only in engine settings see identical prompts. A task's whole grid is
decoded greedily in one batched call; a sample is correct iff the first run of digits of the
continuation (`parse_answer`) equals the answer.

A requested length that does not fit the model's context together with the answer is clipped to
the longest that does; the grid keeps the requested label and records the length used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvflow.sampling_params import SamplingParams
from kvflow.train.synthetic import RetrievalSample, RetrievalTasks, parse_answer

# (prompts as token ids, max new tokens per prompt) -> generated text per prompt
GenerateFn = Callable[[list[list[int]], list[int]], list[str]]

_PASSKEY, _MULTIKEY = 1, 2  # task codes in the per-cell seeds
_SLACK = 2  # extra tokens decoded beyond the answer's length


def engine_generate_fn(llm: Any, use_tqdm: bool = False, kv_budget: Callable[[int], int] | None = None) -> GenerateFn:
    """Greedy decoding through our engine: one `LLM.generate` call for the whole batch.

    `kv_budget` (prompt tokens -> tokens) gives each request its own budget under the engine's KV
    policy (`kvflow eval --kv-budget-fraction`), so every length keeps the same share of its prompt.
    """

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[str]:
        params = [SamplingParams(temperature=0.0, max_tokens=m,
                                 kv_budget=None if kv_budget is None else kv_budget(len(p)))
                  for p, m in zip(prompts, max_tokens)]
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=use_tqdm)
        return [out.outputs[0].text for out in outputs]

    return generate


def _cell_rng(seed: int, task: int, length: int, param: float) -> np.random.Generator:
    return np.random.default_rng([seed, task, length, int(round(param * 1_000_000))])


def fit_length(length: int, max_model_len: int, reserve: int) -> int:
    """The longest context <= `length` that leaves `reserve` tokens for the answer."""
    return max(1, min(length, max_model_len - reserve))


def _decode_and_score(samples: list[RetrievalSample], generate: GenerateFn,
                      max_model_len: int) -> tuple[list[str], list[bool]]:
    max_tokens = [max(1, min(len(s.answer_ids) + _SLACK, max_model_len - len(s.prompt_ids))) for s in samples]
    texts = generate([s.prompt_ids for s in samples], max_tokens) if samples else []
    if len(texts) != len(samples):
        raise RuntimeError(f"generator returned {len(texts)} outputs for {len(samples)} prompts")
    return texts, [parse_answer(t) == s.answer for t, s in zip(texts, samples)]


def _grid(cells: dict[tuple[int, int], list[bool]], rows: int, cols: int) -> list[list[float | None]]:
    return [[(float(np.mean(cells[(i, j)])) if cells.get((i, j)) else None) for j in range(cols)]
            for i in range(rows)]


def _mean(grid: list[list[float | None]]) -> float | None:
    values = [v for row in grid for v in row if v is not None]
    return float(np.mean(values)) if values else None


def _score_grid(samples: list, where: list[tuple[int, int, int]], generate: GenerateFn, max_model_len: int,
                row_key: str, row_values: list, lengths: Sequence[int]) -> tuple[list, list[dict], float]:
    """Decode every sample in one batch; per-cell accuracy (rows x lengths), per-sample records, seconds."""
    started = time.perf_counter()
    texts, correct = _decode_and_score(samples, generate, max_model_len)
    seconds = time.perf_counter() - started
    cells: dict[tuple[int, int], list[bool]] = {}
    records = []
    for (i, j, trial), sample, text, ok in zip(where, samples, texts, correct):
        cells.setdefault((i, j), []).append(ok)
        records.append({row_key: row_values[i], "length": int(lengths[j]), "trial": trial,
                        "prompt_tokens": len(sample.prompt_ids), "answer": sample.answer,
                        "generated": text, "correct": ok})
    return _grid(cells, len(row_values), len(lengths)), records, seconds


def run_passkey(tasks: RetrievalTasks, generate: GenerateFn, lengths: Sequence[int], depths: Sequence[float],
                trials: int, max_model_len: int, seed: int = 0) -> dict[str, Any]:
    """Accuracy over depth (rows) x context length (columns); a context too short for the needle
    and question is left empty (None) and listed under `skipped`."""
    reserve = len(tasks.passkey_answer_ids("9" * 5)) + _SLACK + 2
    used = [fit_length(length, max_model_len, reserve) for length in lengths]
    samples, where, skipped = [], [], []
    for j, (length, context) in enumerate(zip(lengths, used)):
        for i, depth in enumerate(depths):
            rng = _cell_rng(seed, _PASSKEY, length, depth)
            try:
                cell = [tasks.passkey(context, float(depth), rng) for _ in range(trials)]
            except ValueError as exc:
                skipped.append({"depth": float(depth), "length": int(length), "reason": str(exc)})
                continue
            samples += cell
            where += [(i, j, trial) for trial in range(trials)]
    accuracy, records, seconds = _score_grid(samples, where, generate, max_model_len,
                                             "depth", [float(d) for d in depths], lengths)
    return {
        "lengths": [int(x) for x in lengths],
        "effective_lengths": used,
        "depths": [float(d) for d in depths],
        "trials": trials,
        "accuracy": accuracy,
        "mean_accuracy": _mean(accuracy),
        "min_accuracy": min((v for row in accuracy for v in row if v is not None), default=None),
        "skipped": skipped,
        "num_prompts": len(samples),
        "prompt_tokens": sum(len(s.prompt_ids) for s in samples),
        "seconds": seconds,
        "samples": records,
    }


def run_multikey(tasks: RetrievalTasks, generate: GenerateFn, lengths: Sequence[int], pairs: Sequence[int],
                 trials: int, queries: int, max_model_len: int, seed: int = 0) -> dict[str, Any]:
    """Accuracy over number of key-value pairs (rows) x context length (columns).

    Each trial is one context holding `pairs` assignments, asked for up to `queries` of them
    (the queries share the context, so prefix caching can reuse it). A cell whose facts do not
    fit in the context is left empty (None) and listed under `skipped`.
    """
    reserve = len(tasks.encode(" 9999\n")) + _SLACK + 2
    used = [fit_length(length, max_model_len, reserve) for length in lengths]
    samples, where, skipped = [], [], []
    for j, (length, context) in enumerate(zip(lengths, used)):
        for i, num_pairs in enumerate(pairs):
            rng = _cell_rng(seed, _MULTIKEY, length, num_pairs)
            try:
                cell = [tasks.multikey(context, int(num_pairs), rng, queries) for _ in range(trials)]
            except ValueError as exc:
                skipped.append({"pairs": int(num_pairs), "length": int(length), "reason": str(exc)})
                continue
            for trial, group in enumerate(cell):
                samples += group
                where += [(i, j, trial)] * len(group)
    accuracy, records, seconds = _score_grid(samples, where, generate, max_model_len,
                                             "pairs", [int(n) for n in pairs], lengths)
    return {
        "lengths": [int(x) for x in lengths],
        "effective_lengths": used,
        "pairs": [int(p) for p in pairs],
        "trials": trials,
        "queries": queries,
        "accuracy": accuracy,
        "mean_accuracy": _mean(accuracy),
        "skipped": skipped,
        "num_prompts": len(samples),
        "prompt_tokens": sum(len(s.prompt_ids) for s in samples),
        "seconds": seconds,
        "samples": records,
    }
