"""A request's KV for one layer, out of the paged cache and back in, in the wire layout.

The cache of a layer is [2, num_blocks, kv_heads, block_size, head_dim] (the torch-native and C++
backends share it); on the wire a layer is [2, kv_heads, num_tokens, head_dim]: exactly the
request's tokens, so the bytes moved are 2 · tokens · kv_heads · head_dim · dtype size per
layer and the two sides may use different block sizes.
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


def gather_layer(cache: torch.Tensor, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` slots of `block_ids` as one contiguous [2, H, T, D] tensor."""
    _, _, heads, block_size, head_dim = cache.shape
    n_blocks = -(-num_tokens // block_size)
    ids = torch.tensor(block_ids[:n_blocks], dtype=torch.long)
    blocks = cache.index_select(1, ids)  # [2, nb, H, bs, D]
    tokens = blocks.permute(0, 2, 1, 3, 4).reshape(2, heads, n_blocks * block_size, head_dim)
    return tokens[:, :, :num_tokens].contiguous()


def scatter_layer(cache: torch.Tensor, block_ids: list[int], layer: torch.Tensor) -> None:
    """Write a [2, H, T, D] layer into the first slots of `block_ids` (the last block's tail untouched)."""
    _, _, heads, block_size, head_dim = cache.shape
    num_tokens = layer.shape[2]
    full, rest = divmod(num_tokens, block_size)
    if full:
        ids = torch.tensor(block_ids[:full], dtype=torch.long)
        blocks = layer[:, :, : full * block_size].reshape(2, heads, full, block_size, head_dim).permute(0, 2, 1, 3, 4)
        cache.index_copy_(1, ids, blocks.to(cache.dtype))
    if rest:
        cache[:, block_ids[full], :, :rest] = layer[:, :, full * block_size :]
