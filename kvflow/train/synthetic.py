"""Synthetic long-context retrieval tasks, shared by training and evaluation.

* passkey (needle in a haystack): a five-digit key stated once at some depth of filler text,
  asked for at the end;
* multi-key associative recall: `kv["word"] = 1234` assignments scattered through the filler,
  then `assert kv["word"] ==` for one (or, in training, several) of them.

Samples are built at the token level so a prompt has exactly the requested length; the filler is
real text (CPython source and docs), so the same tokens also teach language modelling. Digits are
single tokens in our tokenizer, so answers are copied digit by digit.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
KV_ASSIGN = '\nkv["{key}"] = {value}\n'
KV_QUERY = '\nassert kv["{key}"] =='


@dataclass
class RetrievalSample:
    """A prompt (starting with BOS) and the answer a model should continue it with."""

    kind: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    context_len: int
    depth: float | None = None
    num_pairs: int | None = None


def parse_answer(text: str) -> str:
    """The first run of digits in a generated continuation ('' if none)."""
    digits = ""
    for ch in text.lstrip():
        if ch.isdigit():
            digits += ch
        elif digits or not ch.isspace():
            break
    return digits


class RetrievalTasks:
    """Builds passkey and key-value recall samples from a filler token stream."""

    def __init__(self, tokenizer, filler: np.ndarray) -> None:
        if len(filler) < 16:
            raise ValueError("filler stream is too short")
        self.tokenizer = tokenizer
        self.filler = filler
        self.bos = tokenizer.bos_token_id
        self.question_ids = self.encode(PASSKEY_QUESTION)  # the same for every sample: encode once

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _filler(self, n: int, rng: np.random.Generator) -> list[int]:
        if n <= 0:
            return []
        if n >= len(self.filler):
            reps = -(-n // len(self.filler))
            return np.tile(self.filler, reps)[:n].tolist()
        start = int(rng.integers(0, len(self.filler) - n))
        return self.filler[start:start + n].tolist()

    def weave(self, inserts: list[list[int]], positions: Sequence[float], total: int,
               rng: np.random.Generator) -> list[int]:
        """BOS + `total` tokens of filler with `inserts` placed at relative `positions` (0 to 1)."""
        n_filler = total - sum(len(x) for x in inserts)
        if n_filler < 0:
            raise ValueError(f"context of {total} tokens is too short for the inserted facts")
        filler = self._filler(n_filler, rng)
        cuts = sorted(zip((int(round(p * n_filler)) for p in positions), range(len(inserts))))
        out, prev = [self.bos], 0
        for cut, index in cuts:
            out += filler[prev:cut] + inserts[index]
            prev = cut
        return out + filler[prev:]

    @staticmethod
    def random_key(rng: np.random.Generator, digits: int = 5) -> str:
        first = str(int(rng.integers(1, 10)))
        return first + "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1))

    @staticmethod
    def random_word(rng: np.random.Generator, length: int = 5) -> str:
        return "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, size=length))

    def passkey(self, context_len: int, depth: float, rng: np.random.Generator,
                key: str | None = None) -> RetrievalSample:
        """A prompt of exactly `context_len` tokens with the needle at relative `depth` of the filler."""
        key = key or self.random_key(rng)
        needle = self.encode(PASSKEY_NEEDLE.format(key=key))
        question = self.question_ids
        body = self.weave([needle], [depth], context_len - 1 - len(question), rng)
        return RetrievalSample("passkey", body + question, self.passkey_answer_ids(key), key, context_len, depth=depth)

    def passkey_answer_ids(self, key: str) -> list[int]:
        return self.encode(f" {key}.")

    def kv_facts(self, num_pairs: int, rng: np.random.Generator
                 ) -> tuple[list[str], list[str], list[list[int]], list[float]]:
        """Distinct random words, their 4-digit values, the encoded assignments and their positions."""
        words: list[str] = []
        while len(words) < num_pairs:
            word = self.random_word(rng)
            if word not in words:
                words.append(word)
        values = [self.random_key(rng, 4) for _ in words]
        inserts = [self.encode(KV_ASSIGN.format(key=w, value=v)) for w, v in zip(words, values)]
        return words, values, inserts, np.sort(rng.uniform(0.0, 1.0, size=num_pairs)).tolist()

    def multikey(self, context_len: int, num_pairs: int, rng: np.random.Generator,
                 num_queries: int = 1) -> list[RetrievalSample]:
        """`num_queries` samples sharing one context of `num_pairs` assignments (queries differ)."""
        words, values, inserts, positions = self.kv_facts(num_pairs, rng)
        asked = rng.choice(num_pairs, size=min(num_queries, num_pairs), replace=False)
        queries = {int(i): self.encode(KV_QUERY.format(key=words[i])) for i in asked}
        query_len = max(len(q) for q in queries.values())
        body = self.weave(inserts, positions, context_len - 1 - query_len, rng)
        samples = []
        for i, query in queries.items():
            pad = self._filler(query_len - len(query), rng)
            samples.append(RetrievalSample("multikey", body + pad + query, self.encode(f" {values[i]}\n"),
                                           values[i], context_len, num_pairs=num_pairs))
        return samples
