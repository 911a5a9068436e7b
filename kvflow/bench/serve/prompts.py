"""Text prompts of an exact token count under the served model's tokenizer.

Prompts are sent as text because every OpenAI-compatible endpoint accepts text (chat accepts
nothing else). Random token ids are no good for that: their decoded text rarely re-encodes to the
same number of tokens (byte-level merges across boundaries, partial UTF-8). Instead, prompts are
made of whole words that are single tokens when preceded by a space: whitespace pre-tokenizers
split on spaces before merging, so ``n`` such words joined by spaces encode to ``n`` tokens. A
final encode checks the count and grows or trims the tail until it matches, which also covers
tokenizers that do not behave this way.

Counts exclude special tokens (a BOS the server adds, a chat template's wrapping): those are the
server's business, and its own count comes back in ``usage.prompt_tokens``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Words made of ASCII letters only: no digits or punctuation that pre-tokenizers split apart.
_WORD = re.compile(r"[A-Za-z]{2,}")
#: Repair rounds before giving up on an exact count (one or two suffice in practice).
_MAX_REPAIRS = 16
#: Fewer usable words than this and the builder falls back to words that encode alone as one token.
_MIN_POOL = 8


@dataclass(frozen=True)
class Prompt:
    """A prompt's text, the words it was built from (a prefix for longer prompts) and its length."""

    text: str
    words: tuple[str, ...]
    num_tokens: int


class PromptBuilder:
    """Builds seeded random prompts of exact token lengths for one tokenizer.

    ``tokenizer`` is a Hugging Face tokenizer (``transformers.AutoTokenizer``): the builder needs
    ``__call__`` / ``encode`` with ``add_special_tokens``, ``batch_decode``, ``len()`` and
    ``all_special_ids``.
    """

    def __init__(self, tokenizer: Any, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.pool, self.first_pool = self._word_pools()
        self.inexact = 0  # prompts whose exact length could not be reached

    def _word_pools(self) -> tuple[list[str], list[str]]:
        """(words that are one token after a space, words that are one token at the start)."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        ids = [i for i in range(len(self.tokenizer)) if i not in special]
        texts = self.tokenizer.batch_decode([[i] for i in ids])
        words = sorted({t.strip() for t in texts if _WORD.fullmatch(t.strip())})
        if not words:
            raise ValueError("tokenizer has no alphabetic word tokens to build prompts from")
        spaced = self.tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
        alone = self.tokenizer(words, add_special_tokens=False)["input_ids"]
        pool = [w for w, e in zip(words, spaced) if len(e) == 1]
        first = [w for w, e in zip(words, alone) if len(e) == 1]
        if len(pool) < _MIN_POOL:
            pool = first if len(first) >= len(pool) else pool
        return pool or words, first or pool or words

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _sample(self, pool: Sequence[str], n: int) -> list[str]:
        return [pool[i] for i in self.rng.integers(0, len(pool), size=n)]

    def build(self, num_tokens: int, prefix: Sequence[str] = ()) -> Prompt:
        """A prompt of ``num_tokens`` tokens; it starts with the words of ``prefix`` when given.

        The prefix is never changed, so prompts built on the same prefix share its tokens exactly
        (what a prefix cache sees). If the exact count cannot be reached (a tokenizer that merges
        across spaces), the closest prompt found is returned and ``inexact`` is incremented.
        """
        if num_tokens < 1:
            raise ValueError(f"a prompt needs at least 1 token, got {num_tokens}")
        prefix = list(prefix)
        base = self.count(" ".join(prefix)) if prefix else 0
        need = num_tokens - base
        if need < 0:
            raise ValueError(f"prefix has {base} tokens, more than the {num_tokens} asked for")
        if prefix:
            tail = self._sample(self.pool, need)
            keep = 0
        else:
            tail = self._sample(self.first_pool, 1) + self._sample(self.pool, need - 1)
            keep = 1  # the first word stays: it was chosen to be one token at the start
        n, words = self._fit(num_tokens, prefix, tail, keep, lambda ws: self.count(" ".join(ws)))
        return Prompt(text=" ".join(words), words=tuple(words), num_tokens=n)

    def continuation(self, num_tokens: int) -> Prompt:
        """Words of ``num_tokens`` tokens to append after a space to other text (a later chat turn).

        Counted as ``" " + text``: that is how they are encoded inside the longer prompt, where a
        whitespace pre-tokenizer keeps them apart from whatever text comes before.
        """
        if num_tokens < 1:
            raise ValueError(f"a continuation needs at least 1 token, got {num_tokens}")
        tail = self._sample(self.pool, num_tokens)
        n, words = self._fit(num_tokens, [], tail, 1, lambda ws: self.count(" " + " ".join(ws)))
        return Prompt(text=" ".join(words), words=tuple(words), num_tokens=n)

    def _fit(
        self,
        num_tokens: int,
        prefix: list[str],
        tail: list[str],
        keep: int,
        measure: Callable[[list[str]], int],
    ) -> tuple[int, list[str]]:
        """Grow or trim ``tail`` (never below ``keep`` words) until ``measure(prefix + tail)`` hits.

        Returns the closest (count, words) found; a miss is counted in ``inexact`` and logged once.
        """
        best: tuple[int, list[str]] | None = None
        for _ in range(_MAX_REPAIRS):
            words = prefix + tail
            n = measure(words)
            if best is None or abs(n - num_tokens) < abs(best[0] - num_tokens):
                best = (n, words)
            if n == num_tokens:
                break
            diff = num_tokens - n
            if diff > 0:
                tail += self._sample(self.pool, diff)
            elif len(tail) + diff >= keep:
                del tail[len(tail) + diff:]
            elif len(tail) > keep:
                del tail[-1]
            else:
                break
        assert best is not None
        n, words = best
        if n != num_tokens:
            self.inexact += 1
            if self.inexact == 1:
                log.warning("could not build a prompt of exactly %d tokens (got %d); "
                            "this tokenizer merges across spaces", num_tokens, n)
        return n, words
