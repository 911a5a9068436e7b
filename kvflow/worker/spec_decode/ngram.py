"""Prompt lookup (n-gram) proposals: text often repeats what came before it — code being edited,
a document being quoted, a list being continued — so the tokens that followed the latest earlier
occurrence of a sequence's last n tokens are a cheap guess at what follows now. Costs no model.

For n from `max_n` down to `min_n` (longer matches first: they are the more specific), find the
latest earlier position where the last n tokens occurred; propose up to k tokens that followed it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvflow.worker.spec_decode import Proposals
from kvflow.worker.step import SequenceView


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup needs 1 <= min <= max, got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: Sequence[SequenceView], new_tokens: Sequence[list[int]],
                counts: Sequence[int]) -> Proposals:
        return Proposals([self.propose_one(r.all_token_ids + new, k)
                          for r, new, k in zip(requests, new_tokens, counts)])

    def propose_one(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens (none when no suffix of length min_n..max_n occurred before)."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n:]
            # Every window of n tokens that starts before the suffix itself: [0, length - n).
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                follow = int(hits[-1]) + n  # the latest occurrence: what followed it
                return tokens[follow:follow + k].tolist()
        return []
