"""What the runner is given each step, and what it gives back: the contract between the scheduler
(kvflow/core/) and the worker, stated here so the worker imports nothing above it.

The scheduler hands the runner `ScheduledChunk`s: a run of one sequence's tokens whose KV is
computed this step. A sequence is anything that offers `SequenceView` (the core's `Request`
does). The runner answers with a `RunnerOutput`: for each sequence whose chunk reached the end of
its known tokens, the tokens sampled after it, as a list (one, or several when the step verified
speculative tokens: the accepted proposals and one more), with their logprobs where asked for, and,
with speculative decoding, the tokens proposed for the sequence's next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvflow.lora_request import AdapterRef
from kvflow.sampling_params import SamplingParams


@dataclass
class TokenLogprobs:
    """Logprob of the chosen token plus the top-k alternatives (all raw model logprobs)."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class SequenceView(Protocol):
    """What the runner reads of a scheduled sequence."""

    request_id: str
    all_token_ids: list[int]
    prompt_token_ids: list[int]
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    prompt_logprobs: list[TokenLogprobs | None]
    eos_token_ids: tuple[int, ...]
    # Speculative decoding with a draft model: the generator its proposals draw from (seeded
    # requests), and how many of its tokens the draft's KV cache holds.
    spec_generator: torch.Generator | None
    spec_draft_computed: int
    # The LoRA adapter it runs with (None: the base model alone), and the block zoo's variant (None: the base).
    lora: AdapterRef | None
    variant: AdapterRef | None

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    def blocked_token_ids(self) -> list[int]: ...


@dataclass
class KVPolicyOp:
    """What the runner does this step for a chunk's KV policy (kvflow/core/kv_policy.py decides):

    - "quest": a decode that reads only `read_blocks` blocks per layer: its `sink_blocks` first ones,
      its `window_blocks` newest ones and the best others by Quest's bound;
    - "h2o": a decode whose per-block attention mass is reported (`RunnerOutput.kv_block_mass`);
    - "snapkv": the chunk that ends the prompt: after attending, keep `budget` prompt tokens per
      layer and kv head, chosen by the chunk's last `window` queries, copied into `dest_block_ids`;
    - "specontext": a decode whose KV heads each read `budget` entries chosen by the retrieval head
      (the first `sink_tokens` always), moved into its buffer blocks `dest_block_ids`, then its newest
      `window_blocks` blocks; `buffer_tokens` [kv_heads, budget] is what the buffer holds (entry per
      slot, -1 empty; None: nothing yet), and entries before `verified_tokens` have checked
      retrieval keys (the runner reports both back, `RunnerOutput.kv_specontext`).
    """

    name: str
    budget: int = 0
    window: int = 0
    read_blocks: int = 0
    sink_blocks: int = 0
    sink_tokens: int = 0
    window_blocks: int = 0
    dest_block_ids: list[int] = field(default_factory=list)
    buffer_tokens: torch.Tensor | None = None
    verified_tokens: int = 0
    # specontext with --kv-resident-memory (kvflow/core/kv_residency.py): layers [tier_layer, L) of the
    # first `tier_blocks` blocks are in the offload tier before the step (moves read them there), and
    # [offload_layer, L) of the first `offload_blocks` after it (the runner moves the difference).
    tier_layer: int = 0
    tier_blocks: int = 0
    offload_layer: int = 0
    offload_blocks: int = 0


@dataclass
class SpeContextResult:
    """A SpeContext decode's step: what its buffer holds now, and what moved."""

    buffer_tokens: torch.Tensor  # [kv_heads, budget] entries, per slot
    verified_tokens: int  # entries whose retrieval keys are checked
    moved_tokens: int  # (KV head, token) pairs loaded into the buffer this step
    moved_bytes: int  # their KV, every layer
    kept_tokens: int  # pairs already there (the overlap with the previous step's selection)
    recomputed_keys: int  # retrieval keys that did not match the tokens and were recomputed


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `request` starting at position `start` are computed this step.

    `kv_shift`: positions dropped from the front of the request's cache by its KV policy (evicted
    blocks, SnapKV's compaction): the token at position p sits at cache index p - kv_shift of its
    blocks, and keeps position p for its rotary embedding.

    KIVI (kvflow/attention/kivi.py): `kv_residual_slot`, the ring slot of the request's newest
    tokens; `kv_prefix_floor`, the cache entries it found quantised in the prefix cache;
    `kv_ring_shift`, positions evicted since its last step (its ring rotates by as many first).

    Speculative decoding: `spec_token_ids` are proposals verified this step; they follow the
    request's known tokens and `num_tokens` counts them (a decode verifying K proposals computes
    K + 1 tokens), with `spec_draft_probs` [K, V] the draft model's q for them (None: point-mass
    proposals, as prompt lookup's). `propose`: how many tokens the runner proposes for the request's
    next step (0: none; at most the engine's K; a draft model's KV for them fits the request's blocks)."""

    request: SequenceView
    start: int
    num_tokens: int
    kv_shift: int = 0
    kv_op: KVPolicyOp | None = None
    kv_residual_slot: int = -1
    kv_prefix_floor: int = 0
    kv_ring_shift: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: torch.Tensor | None = None
    propose: int = 0

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so its last logits give a new token."""
        return self.start + self.num_tokens - len(self.spec_token_ids) == self.request.num_tokens


@dataclass
class RunnerOutput:
    """One step's results, by request id."""

    sampled: dict[str, list[int]] = field(default_factory=dict)  # new tokens, in order
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per sampled token, if asked
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # this step's prompt positions
    # H2O: the attention mass each of the request's blocks took this step (summed over layers, heads).
    kv_block_mass: dict[str, list[float]] = field(default_factory=dict)
    kv_specontext: dict[str, SpeContextResult] = field(default_factory=dict)  # SpeContext decodes' selections
    # Speculative decoding: tokens proposed for each request's next step (chunks with `propose`).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_draft_probs: dict[str, torch.Tensor] = field(default_factory=dict)  # a draft model's q for them
    spec_draft_computed: dict[str, int] = field(default_factory=dict)  # tokens whose draft KV is valid now


class StepHooks(Protocol):
    """Called by the runner around the model's forward pass (a KV connector's worker side: a prefill
    instance streams each layer's KV as soon as that layer is computed)."""

    def begin_step(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Before the forward pass; True if the model should report each finished layer."""

    def layer_done(self, layer: int) -> None:
        """Layer `layer` has written this step's KV."""

    def end_step(self) -> None:
        """After the forward pass (also when it failed)."""
