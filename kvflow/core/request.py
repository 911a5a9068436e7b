"""The state of one sequence inside the engine core.

The scheduler's whole view of a request is `num_tokens_to_compute - num_computed_tokens`: the tokens
whose KV still has to be computed. A prompt chunk, a decode step, a prefix-cache hit and a request
resumed after preemption are all the same rule. (`num_tokens_to_compute` is `num_tokens`, except for
a request that only scores its prompt: see `prompt_only`.)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvflow.kv_transfer.wire import KVTransferParams
from kvflow.lora_request import AdapterRef
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import TokenLogprobs

if TYPE_CHECKING:
    from kvflow.core.kv_policy import KVPolicy


# Derives a seeded request's draft generator from its seed (any fixed odd constant would do).
_DRAFT_SEED_MIX = 0x9E3779B97F4A7C15


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # A decode instance's request with blocks allocated, waiting for its KV from a prefill instance.
    RECEIVING = "receiving"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass
class LayerGroupBlocks:
    """A request's block table in one group of layers of a cache split into groups (kv_cache_manager.py),
    with its prefix-index state: the same fields as the request's own, which are group 0's."""

    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0
    indexed_parent_id: int | None = None


class Request:
    """One sequence: its tokens, KV blocks, sampling state and outputs."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        max_model_len: int = 2**31,
        leader: Request | None = None,
        seed: int | None = None,
        priority: int = 0,
        kv_transfer: KVTransferParams | None = None,
        cache_salt: str | None = None,
        lora: AdapterRef | None = None,
        variant: AdapterRef | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.num_cached_blocks = 0
        self.indexed_parent_id: int | None = None
        # A cache split into layer groups (a block zoo sharing its variants' leading layers' KV): the tables of
        # groups 1.. (the four fields above are group 0's); none while the cache has one group.
        self.kv_groups: list[LayerGroupBlocks] = []
        # Prompt tokens whose KV came from the prefix cache (or an n > 1 sibling) on admission.
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # The generation cap: max_tokens, or what is left of the context.
        room = max_model_len - len(prompt_token_ids)
        self.max_output_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        # n > 1 siblings wait for the leader's prompt so they can share its KV blocks.
        self.leader = leader
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.output_logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs | None] = []
        # Requests asking for prompt logprobs compute their whole prompt (no prefix-cache hits).
        self.skip_prefix_cache = params.prompt_logprobs is not None
        self.first_token_time: float | None = None
        self.scheduled_time: float | None = None
        # Disaggregated serving: the transfer this request's KV goes out under (prefill instance)
        # or comes in from (decode instance, until loaded; then None, like a local request).
        self.kv_transfer = kv_transfer
        # Chained into its prefix blocks' hashes: requests with different salts never share KV blocks.
        self.cache_salt = cache_salt
        # The LoRA adapter and the block zoo's variant it runs with (None: the base model); their keys salt its
        # KV blocks too.
        self.lora = lora
        self.variant = variant
        # KV policy (kv_policy.py): what it keeps or reads of this request's KV; None keeps all.
        self.kv_policy: KVPolicy | None = None
        # Positions dropped from the front of the cache by the policy: position p sits at index p - kv_shift.
        self.kv_shift = 0
        # The policy dropped KV, so what is computed from now on is private (never indexed or shared).
        self.kv_altered = False
        # Blocks held for this step's policy work beyond the tokens' own (SnapKV's destination).
        self.kv_spare_blocks: list[int] = []
        # KIVI (kvflow/attention/kivi.py): the ring slot holding this request's newest tokens while it
        # runs, and the prompt tokens its prefix hit brought already quantised (H).
        self.kv_residual_slot: int | None = None
        self.kv_prefix_floor = 0
        # Positions its KV policy evicted since its last step: its ring rotates by as many (kivi.py).
        self.kv_ring_shift = 0
        # Speculative decoding: the tokens proposed to follow its last one, verified in its next step
        # (with a draft model: its q for each, [K, V]); how many of its tokens the draft model's KV
        # cache holds; the generator a seeded request's draft proposals draw from (its own, so the
        # target's draws stay in a fixed order).
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs: torch.Tensor | None = None
        self.spec_draft_computed = 0
        self.spec_generator: torch.Generator | None = None
        if seed is not None:
            self.spec_generator = torch.Generator().manual_seed((seed ^ _DRAFT_SEED_MIX) % 2**64)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def prompt_only(self) -> bool:
        """max_tokens=0: the request scores its prompt (prompt logprobs) and generates nothing."""
        return self.params.prompt_only

    @property
    def num_tokens_to_compute(self) -> int:
        """How many of its tokens need KV before the request is done (or samples its next token).

        All of them, except for a prompt-only request, which finishes when its prompt logprobs are
        scored, with nothing sampled: the last prompt token's KV and logits predict nothing it asked
        for, so it computes one token fewer; an n > 1 sibling computes none (only the leader's prompt
        logprobs are reported), nor does a request that asked for no prompt logprobs."""
        if not self.prompt_only:
            return self.num_tokens
        if self.leader is not None or self.params.prompt_logprobs is None:
            return 0
        return self.num_prompt_tokens - 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """One new output token, with its logprobs when the request asked for them."""
        self.all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions for the token just appended (stop strings live in the detokenizer).
        A step that appends several tokens checks after each, and drops those after a stop."""
        last = self.all_token_ids[-1]
        n_out = self.num_output_tokens
        if n_out >= self.params.min_tokens:
            if last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in self.params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if n_out >= self.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def blocked_token_ids(self) -> list[int]:
        """Tokens that may not be sampled yet: EOS and stop ids while under min_tokens."""
        if self.num_output_tokens >= self.params.min_tokens:
            return []
        return list(self.eos_token_ids) + list(self.params.stop_token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, {self.status.name})"
        )
