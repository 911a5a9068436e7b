"""A request's KV for one layer, out of the paged cache and back in, in the wire layout.

The cache of a layer is [2, num_blocks, kv_heads, block_size, head_dim] (the torch-native and C++
backends share it); on the wire a layer is [2, kv_heads, num_tokens, head_dim]: exactly the
request's tokens (from `start` on, when the puller holds the first ones), so the bytes moved are
2 · tokens · kv_heads · head_dim · dtype size per layer and the two sides may use different
block sizes.
"""

from __future__ import annotations

import torch


class PagedKV:
    """An instance's per-layer cache tensors, with the shape both ends of a transfer must agree on
    (read off the tensors themselves)."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        self.caches = caches
        self.num_layers = len(caches)
        _, _, self.num_kv_heads, _, self.head_dim = caches[0].shape
        self.dtype = caches[0].dtype
        self.dtype_name = str(self.dtype).removeprefix("torch.")

    def layer_nbytes(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.num_kv_heads * self.head_dim * self.caches[0].element_size()


def gather_layer(cache: torch.Tensor, block_ids: list[int], num_tokens: int, start: int = 0) -> torch.Tensor:
    """Slots [start, num_tokens) of `block_ids` as one contiguous [2, H, T, D] tensor."""
    _, _, heads, block_size, head_dim = cache.shape
    first = start // block_size
    n_blocks = max(0, -(-num_tokens // block_size) - first)
    ids = torch.tensor(block_ids[first:first + n_blocks], dtype=torch.long)
    blocks = cache.index_select(1, ids)  # [2, nb, H, bs, D]
    tokens = blocks.permute(0, 2, 1, 3, 4).reshape(2, heads, n_blocks * block_size, head_dim)
    offset = first * block_size
    return tokens[:, :, start - offset:num_tokens - offset].contiguous()


def scatter_layer(cache: torch.Tensor, block_ids: list[int], layer: torch.Tensor, start: int = 0) -> None:
    """Write a [2, H, T, D] layer into slots [start, start + T) of `block_ids` (other slots untouched)."""
    _, _, heads, block_size, head_dim = cache.shape
    first, skip = divmod(start, block_size)
    block_ids = block_ids[first:]
    if skip and layer.shape[2]:  # the head of a block another request's tokens fill
        head = min(block_size - skip, layer.shape[2])
        cache[:, block_ids[0], :, skip:skip + head] = layer[:, :, :head]
        layer, block_ids = layer[:, :, head:], block_ids[1:]
    num_tokens = layer.shape[2]
    full, rest = divmod(num_tokens, block_size)
    if full:
        ids = torch.tensor(block_ids[:full], dtype=torch.long)
        blocks = layer[:, :, : full * block_size].reshape(2, heads, full, block_size, head_dim).permute(0, 2, 1, 3, 4)
        cache.index_copy_(1, ids, blocks.to(cache.dtype))
    if rest:
        cache[:, block_ids[full], :, :rest] = layer[:, :, full * block_size :]
