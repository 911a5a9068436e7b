"""Speculative decoding's proposers: who guesses the tokens a verification step scores (`Proposer`).

The scheduler schedules a decoding request's proposals with its last token (`ScheduledChunk.
spec_token_ids`), the runner scores them in one pass and keeps what rejection sampling accepts
(kvflow/worker/rejection_sampler.py), then asks the proposer for the next step's proposals:
`ngram.py` (prompt lookup, no model) or `draft.py` (a small model on its own paged KV cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvflow.config import EngineConfig
from kvflow.worker.step import SequenceView


@dataclass
class Proposals:
    """Per request: the proposed tokens; a draft model's q row for each ([len, V], None: a point-mass
    proposal, as prompt lookup's); the tokens whose draft KV is now valid (None: no draft KV)."""

    token_ids: list[list[int]]
    draft_probs: list[torch.Tensor | None] | None = None
    draft_computed: list[int] | None = None


class Proposer(Protocol):
    def propose(self, requests: Sequence[SequenceView], new_tokens: Sequence[list[int]],
                counts: Sequence[int]) -> Proposals:
        """Up to `counts[i]` tokens to follow request i's tokens and this step's `new_tokens[i]` (not yet
        appended)."""
        ...


def draft_kv_bytes_per_block(config: EngineConfig) -> int:
    """Bytes a draft model's KV adds to each block (0 without one), for the memory budget."""
    if config.speculative.speculative_method != "draft":
        return 0
    from kvflow.worker.spec_decode.draft import draft_kv_spec, draft_model_config

    return draft_kv_spec(config, draft_model_config(config)).bytes_per_block


def make_proposer(config: EngineConfig, num_blocks: int, device: torch.device,
                  use_cpu_kernels: bool) -> Proposer | None:
    """The proposer the config asks for (None: speculation is off); a draft model gets `num_blocks`
    KV blocks parallel to the target's."""
    method = config.speculative.speculative_method
    if method is None:
        return None
    if method == "ngram":
        from kvflow.worker.spec_decode.ngram import NgramProposer

        return NgramProposer(config.speculative.prompt_lookup_min, config.speculative.prompt_lookup_max)
    from kvflow.worker.spec_decode.draft import DraftProposer

    return DraftProposer(config, num_blocks, device, use_cpu_kernels)
