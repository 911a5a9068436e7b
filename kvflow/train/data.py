"""Training batches: CPython text mixed with passkey and key-value retrieval sequences.

A batch is a pure function of (seed, step), so resuming from a checkpoint replays exactly the
data the interrupted run would have seen, with no sampler state to save. Answer tokens of the
retrieval tasks get a larger loss weight: they are a handful of tokens in thousands, and they are
what teaches the model to look far back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvflow.train.synthetic import KV_QUERY, RetrievalTasks


@dataclass(frozen=True)
class TaskMix:
    plain: float = 0.4
    passkey: float = 0.3
    multikey: float = 0.3
    answer_weight: float = 10.0
    max_pairs: int = 24
    max_queries: int = 4

    def probabilities(self) -> np.ndarray:
        p = np.array([self.plain, self.passkey, self.multikey], dtype=np.float64)
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError("task mix weights must be non-negative and not all zero")
        return p / p.sum()


class TrainingBatches:
    def __init__(self, tasks: RetrievalTasks, stream: np.ndarray, mix: TaskMix, seed: int) -> None:
        self.tasks = tasks
        self.stream = stream
        self.mix = mix
        self.seed = seed

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, seq_len + 1] and target weights [B, seq_len] (weight of predicting ids[:, t + 1])."""
        rng = np.random.default_rng([self.seed, step])
        ids = np.zeros((batch_size, seq_len + 1), dtype=np.int64)
        weights = np.ones((batch_size, seq_len), dtype=np.float32)
        kinds = rng.choice(3, size=batch_size, p=self.mix.probabilities())
        for row, kind in enumerate(kinds):
            seq, answer_mask = [self._plain, self._passkey, self._multikey][kind](seq_len + 1, rng)
            assert len(seq) == seq_len + 1, (kind, len(seq))
            ids[row] = seq
            weights[row][answer_mask[1:]] = self.mix.answer_weight
        return torch.from_numpy(ids), torch.from_numpy(weights)

    def _plain(self, total: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
        start = int(rng.integers(0, len(self.stream) - total))
        seq = [self.tasks.bos] + self.stream[start:start + total - 1].tolist()
        return seq, np.zeros(total, dtype=bool)

    def _passkey(self, total: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
        key = self.tasks.random_key(rng, int(rng.integers(3, 8)))
        answer_len = len(self.tasks.passkey_answer_ids(key))
        sample = self.tasks.passkey(total - answer_len, float(rng.uniform()), rng, key=key)
        mask = np.zeros(total, dtype=bool)
        mask[len(sample.prompt_ids):] = True
        return sample.prompt_ids + sample.answer_ids, mask

    def _multikey(self, total: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
        num_pairs = int(rng.integers(1, min(self.mix.max_pairs, max(1, total // 40)) + 1))
        words, values, inserts, positions = self.tasks.kv_facts(num_pairs, rng)
        while num_pairs > 1 and sum(len(x) for x in inserts) > total // 2:  # long words on a small vocab
            num_pairs -= 1
            words, values = words[:num_pairs], values[:num_pairs]
            inserts, positions = inserts[:num_pairs], positions[:num_pairs]
        asked = rng.choice(num_pairs, size=int(rng.integers(1, min(self.mix.max_queries, num_pairs) + 1)),
                           replace=False)
        tail: list[int] = []
        spans: list[tuple[int, int]] = []
        for i in asked:
            query = self.tasks.encode(KV_QUERY.format(key=words[i]))
            answer = self.tasks.encode(f" {values[i]}\n")
            if spans and len(tail) + len(query) + len(answer) > total // 4:
                break
            spans.append((len(tail) + len(query), len(tail) + len(query) + len(answer)))
            tail += query + answer
        body = self.tasks.weave(inserts, positions, total - 1 - len(tail), rng)
        mask = np.zeros(total, dtype=bool)
        for lo, hi in spans:
            mask[len(body) + lo:len(body) + hi] = True
        return body + tail, mask

