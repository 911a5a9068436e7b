"""The attention backend interface: the one place the engine touches KV-cache memory.

The runner builds an `AttentionMetadata` once per step; every layer then calls
`backend.forward(q, k, v, kv_cache, metadata, ...)`, which writes the new keys/values into their
slots and attends over each sequence's paged context. The engine never knows which backend runs.
What a cache block holds is the KV-cache spec's to say (kv_spec.py); a backend says which specs it
can read (`supports`), and the runner allocates the caches from the spec.

Token layout of a step: the first `num_decodes` sequences are decodes (one query token each),
the remaining sequences are prefill chunks (any number of query tokens, after a cached or
earlier-computed prefix). Tokens are packed flat in that order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV

if TYPE_CHECKING:
    from kvflow.attention.kivi import KiviStep
    from kvflow.attention.policy_step import PolicyStep
    from kvflow.attention.shared_prefix import SharedPrefixGroups

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) per token
    seq_lens: torch.Tensor  # [B] int64: context length after this step (prefix + new tokens)
    query_lens: torch.Tensor  # [B] int64: new tokens this step
    query_start_loc: torch.Tensor  # [B + 1] int64: offsets of each sequence in the flat tokens
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    token_seq_index: torch.Tensor | None = None  # [T] int64: which sequence each flat token belongs to
    # Python-side copies, so backends can plan without device syncs.
    seq_lens_list: list[int] = field(default_factory=list)
    query_lens_list: list[int] = field(default_factory=list)
    # Backend-private, per-step derived tensors (masks, gather indices), built by `prepare`; and
    # "block_mass" [num_decodes, max_blocks] when a KV policy wants each block's attention mass,
    # which a backend with `returns_block_mass` adds to from its decode kernel.
    extra: dict[str, Any] = field(default_factory=dict)
    # KV-policy work of this step the attention layers do around the backend (policy_step.py).
    policy: PolicyStep | None = None
    # KIVI's per-step bookkeeping (which groups are quantised, what goes to the ring; kivi.py).
    kivi: KiviStep | None = None
    # Decodes that share leading KV blocks, for kernels that read those blocks once per group
    # (shared_prefix.py); None when the runner's shared_prefix_attention is off or no group exists.
    shared_prefix: SharedPrefixGroups | None = None
    # A cache split into layer groups (kvflow/worker/kv_layer_groups.py): each group's own metadata (its
    # tables and slots), for layers [g * layers_per_group, (g + 1) * layers_per_group).
    layer_groups: list[AttentionMetadata] | None = None
    layers_per_group: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


class AttentionBackend(Protocol):
    name: str

    def supports(self, spec: KVCacheSpec) -> bool:
        """Whether this backend reads and writes caches of this spec (layout, components)."""

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Derive per-step helper tensors once, before the layers run."""

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: LayerKV,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Store k/v for the step's tokens, then attend; returns [T, num_heads, head_dim]."""


def get_backend(device: torch.device | str, name: str = "auto") -> AttentionBackend:
    """The attention backend `name` for a device. "auto": kvflow's Triton kernels on CUDA
    (flash-decoding and FlashAttention-2 prefill over the paged cache), torch-native elsewhere or
    where Triton is not installed."""
    device_type = torch.device(device).type
    if name == "triton" or (name == "auto" and device_type == "cuda"):
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the Triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 "
                             f"for Triton's CPU interpreter), got {device_type}")
        try:
            from kvflow.attention.triton import TritonBackend
        except ImportError as e:
            if name == "triton":
                raise ImportError(f"attention_backend='triton' needs Triton (pip install 'kvflow[gpu]'): {e}") from e
            logger.warning("Triton is unavailable (%s); using the torch-native attention backend", e)
        else:
            return TritonBackend()
    elif name not in ("auto", "torch"):
        raise ValueError(f"unknown attention backend {name!r}")
    from kvflow.attention.torch_native import TorchNativeBackend

    return TorchNativeBackend()
