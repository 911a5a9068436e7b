"""Held-out perplexity scored through the engine, next to a unigram baseline.

The held-out stream is cut into consecutive, non-overlapping windows; each window is a prompt
`[BOS] + chunk` (as the trainer builds its plain-text sequences), and every chunk token is scored
given the tokens before it in its window. The engine returns the log-probabilities of prompt
tokens (`SamplingParams(prompt_logprobs=0)`), so the whole evaluation is one batched `generate`.

The unigram baseline assigns every token its add-one smoothed frequency in the train split,
`p(t) = (count(t) + 1) / (N + V)`, and is evaluated on exactly the tokens the model scored.
Bits per byte divide the total negative log-likelihood (in bits) by the UTF-8 length of the
scored text, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvflow.sampling_params import SamplingParams

# prompts (token ids) -> for each prompt, the log-probability of prompt[i] for i = 1 .. len - 1
ScoreFn = Callable[[list[list[int]]], list[list[float]]]


def make_windows(stream: np.ndarray, context: int, max_tokens: int, bos: int | None) -> list[list[int]]:
    """Prompts of at most `context` tokens covering the first `max_tokens` scored tokens of `stream`.

    With a BOS token each prompt is `[bos] + chunk` and every chunk token is scored, so the scored
    tokens are exactly `stream[:max_tokens]`. Without one, a prompt is a plain chunk whose first
    token is context only.
    """
    if context < 2:
        raise ValueError(f"perplexity context must be >= 2 tokens, got {context}")
    if max_tokens < 1:
        raise ValueError(f"perplexity token count must be >= 1, got {max_tokens}")
    windows: list[list[int]] = []
    if bos is not None:
        tokens = stream[:max_tokens].tolist()
        step = context - 1
        for start in range(0, len(tokens), step):
            windows.append([int(bos)] + tokens[start:start + step])
    else:
        tokens = stream.tolist()
        scored = 0
        for start in range(0, len(tokens) - 1, context):
            chunk = tokens[start:start + context]
            take = min(len(chunk) - 1, max_tokens - scored)
            if take < 1:
                break
            windows.append(chunk[:take + 1])
            scored += take
    if not windows:
        raise ValueError("the held-out stream is too short to score")
    return windows


def scored_tokens(windows: Sequence[Sequence[int]]) -> np.ndarray:
    """The tokens a score function rates: every window's tokens after its first."""
    return np.asarray([t for w in windows for t in w[1:]], dtype=np.int64)


def engine_score_fn(llm: Any, use_tqdm: bool = False, kv_budget: Callable[[int], int] | None = None) -> ScoreFn:
    """Prompt-token log-probabilities from our engine, all windows in one batched call.

    `kv_budget` (prompt tokens -> tokens) gives each window its own budget under the engine's KV
    policy, as the retrieval tasks get theirs. The scores come from prefill, where only streaming
    acts (between prefill chunks); h2o, snapkv and quest act on decode, so they leave them unchanged.
    """

    def score(prompts: list[list[int]]) -> list[list[float]]:
        params: SamplingParams | list[SamplingParams] = SamplingParams(max_tokens=1, temperature=0.0,
                                                                        prompt_logprobs=0)
        if kv_budget is not None:
            params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, kv_budget=kv_budget(len(p)))
                      for p in prompts]
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=use_tqdm)
        result = []
        for prompt, out in zip(prompts, outputs):
            lps = out.prompt_logprobs
            if lps is None or len(lps) != len(prompt):
                raise RuntimeError(f"engine returned {0 if lps is None else len(lps)} prompt logprobs "
                                   f"for a prompt of {len(prompt)} tokens")
            result.append([lps[i][prompt[i]].logprob for i in range(1, len(prompt))])
        return result

    return score


def unigram_logprobs(counts: np.ndarray, tokens: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities (natural log) of `tokens`."""
    vocab = max(int(vocab_size or 0), len(counts), int(tokens.max()) + 1 if len(tokens) else 0)
    full = np.zeros(vocab, dtype=np.float64)
    full[:len(counts)] = counts
    total = full.sum()
    return np.log((full[tokens] + 1.0) / (total + vocab))


def text_bytes(tokenizer: Any, windows: Sequence[Sequence[int]]) -> int:
    """UTF-8 bytes of the scored text (special tokens, e.g. the EOS between documents, count 0)."""
    if tokenizer is None:
        return 0
    return sum(len(tokenizer.decode(list(w[1:]), skip_special_tokens=True).encode("utf-8")) for w in windows)


def summarize(nll_nats: float, num_tokens: int, num_bytes: int) -> dict[str, float | None]:
    mean = nll_nats / num_tokens
    return {
        "nll_per_token": mean,
        "perplexity": math.exp(mean),
        "bits_per_byte": nll_nats / math.log(2) / num_bytes if num_bytes else None,
    }


def evaluate_perplexity(score: ScoreFn, windows: list[list[int]], tokenizer: Any = None,
                        train_counts: np.ndarray | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """Model (and, given train counts, unigram) perplexity and bits per byte on `windows`.

    The unigram's vocabulary (for add-one smoothing) is `vocab_size`, else the tokenizer's size;
    it is widened to cover the counts and every scored id.
    """
    started = time.perf_counter()
    logprobs = score(windows)
    seconds = time.perf_counter() - started
    flat = np.asarray([lp for row in logprobs for lp in row], dtype=np.float64)
    targets = scored_tokens(windows)
    if len(flat) != len(targets):
        raise RuntimeError(f"scored {len(flat)} tokens, expected {len(targets)}")
    if not np.isfinite(flat).all():
        raise RuntimeError("the model gave a non-finite log-probability")
    num_bytes = text_bytes(tokenizer, windows)
    result: dict[str, Any] = {
        "num_tokens": len(targets),
        "num_windows": len(windows),
        "context": max(len(w) for w in windows),
        "num_bytes": num_bytes,
        **summarize(float(-flat.sum()), len(targets), num_bytes),
        "seconds": seconds,
        "tokens_per_second": len(targets) / seconds if seconds > 0 else None,
    }
    if train_counts is not None:
        vocab = vocab_size or (len(tokenizer) if tokenizer is not None else 0)
        vocab = max(vocab, len(train_counts), int(targets.max()) + 1)
        uni = unigram_logprobs(train_counts, targets, vocab)
        result["unigram"] = {
            **summarize(float(-uni.sum()), len(targets), num_bytes),
            "train_tokens": int(train_counts.sum()),
            "vocab_size": vocab,
        }
        result["perplexity_ratio_to_unigram"] = result["perplexity"] / result["unigram"]["perplexity"]
    return result
