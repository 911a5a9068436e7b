"""How well a draft model predicts its teacher: greedy next-token agreement, and what it costs.

Both models score the same held-out windows through our engine (teacher forcing, so every
position is compared on the same prefix); at each position the top-1 token of each model is
read from the prompt log-probabilities (rank 1). Agreement is the fraction of positions where
the two argmaxes match, which is what greedy speculative decoding accepts token by token. Cost is
measured the same way for both: the wall time of scoring the windows, and of a greedy decode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvflow.sampling_params import SamplingParams


def engine_argmax(llm: Any, prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], float]:
    """For each prompt, the engine's top-1 prediction for positions 1 .. len - 1, and the wall time."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - began
    result = []
    for prompt, out in zip(prompts, outputs):
        row = []
        for position in out.prompt_logprobs[1:len(prompt)]:
            row.append(next(t for t, lp in position.items() if lp.rank == 1))
        result.append(row)
    return result, seconds


def decode_seconds_per_token(llm: Any, prompt: Sequence[int], tokens: int = 64) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)  # warm-up
    began = time.perf_counter()
    llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)
    return (time.perf_counter() - began) / tokens


def draft_agreement(teacher: Any, draft: Any, windows: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Teacher-forced top-1 agreement of `draft` with `teacher`, their top-1 accuracies, and costs."""
    teacher_top1, teacher_s = engine_argmax(teacher, windows)
    draft_top1, draft_s = engine_argmax(draft, windows)
    truth = np.concatenate([np.asarray(w[1:]) for w in windows])
    t = np.concatenate([np.asarray(r) for r in teacher_top1])
    d = np.concatenate([np.asarray(r) for r in draft_top1])
    teacher_decode = decode_seconds_per_token(teacher, windows[0][:32])
    draft_decode = decode_seconds_per_token(draft, windows[0][:32])
    return {
        "draft_model": draft.engine.config.model.path,
        "positions": int(len(truth)),
        "agreement": float((t == d).mean()),
        "teacher_top1_accuracy": float((t == truth).mean()),
        "draft_top1_accuracy": float((d == truth).mean()),
        "teacher_parameters": _parameters(teacher),
        "draft_parameters": _parameters(draft),
        "scoring_seconds": {"teacher": teacher_s, "draft": draft_s},
        "decode_ms_per_token": {"teacher": 1000 * teacher_decode, "draft": 1000 * draft_decode},
    }


def _parameters(llm: Any) -> int | None:
    model = getattr(getattr(getattr(llm.engine, "core", None), "runner", None), "model", None)
    return None if model is None else int(sum(p.numel() for p in model.parameters()))
