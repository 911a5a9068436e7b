"""A long-conv layer's history in the paged KV cache: what a block holds for a model without attention.

A long-convolution layer (kvflow/model/longconv/) needs, to compute token t, its conv inputs
u_0 … u_t (hidden_size values per token): that is its whole per-token state, the analogue of keys
and values. It is stored in the ordinary dense KV-cache spec (kv_spec.py) with one kv head of width
hidden_size / 2 (ModelConfig sets num_kv_heads = 1, head_dim = hidden_size / 2 for such a model):
channels [0, H/2) of a token sit in the spec's first plane (the "keys"), channels [H/2, H) in the
second (the "values"). So a block holds block_size tokens × H values per layer, bytes per token are
exactly the history's, and everything that moves or budgets blocks by the spec (the memory budget,
prefix caching, preemption, offload tiers, P/D transfer) works on it unchanged.
"""

from __future__ import annotations

import torch

from kvflow.attention.kv_spec import LayerKV


def _planes(cache: LayerKV, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two planes as [num_blocks * block_size, H/2] slot rows."""
    if not isinstance(cache, torch.Tensor) or cache.dim() != 5 or cache.shape[0] != 2 or cache.shape[2] != 1 \
            or 2 * cache.shape[4] != channels:
        shape = tuple(cache.shape) if isinstance(cache, torch.Tensor) else "a quantised cache"
        raise ValueError(f"a long-conv layer's history needs a dense cache [2, blocks, 1, block_size, "
                         f"{channels // 2}], got {shape}")
    half = channels // 2
    return cache[0].view(-1, half), cache[1].view(-1, half)


def write_history(cache: LayerKV, slot_mapping: torch.Tensor, u: torch.Tensor) -> None:
    """Store the conv inputs `u` [T, H] of a step's tokens in their slots."""
    first, second = _planes(cache, u.shape[-1])
    half = first.shape[1]
    first.index_copy_(0, slot_mapping, u[:, :half].to(first.dtype))
    second.index_copy_(0, slot_mapping, u[:, half:].to(second.dtype))


def read_history(cache: LayerKV, slots: torch.Tensor, channels: int) -> torch.Tensor:
    """The conv inputs held in `slots` (any shape S), as [*S, H]."""
    first, second = _planes(cache, channels)
    flat = slots.reshape(-1)
    rows = torch.cat((first.index_select(0, flat), second.index_select(0, flat)), dim=-1)
    return rows.view(*slots.shape, channels)


def history_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache slots of `positions` (any shape, non-negative) in a sequence's (or, with a [B, blocks]
    table and [B, ...] positions, each sequence's) blocks."""
    if block_table.dim() == 1:
        return block_table[positions // block_size] * block_size + positions % block_size
    rows = torch.arange(block_table.shape[0], device=block_table.device).view(-1, *([1] * (positions.dim() - 1)))
    return block_table[rows, positions // block_size] * block_size + positions % block_size
