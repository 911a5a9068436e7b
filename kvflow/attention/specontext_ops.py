"""SpeContext's tensor work on the paged cache: score the context with the retrieval head's keys,
choose the tokens each KV head reads, and move only what changed into the sequence's buffer.

A SpeContext sequence keeps all its KV in its blocks (nothing is evicted, so its blocks stay exact
and shareable through the prefix cache) and owns a few extra *buffer* blocks. For each decode step:

1. `retrieval_scores`: the retrieval head's query for the new token against the keys of every
   candidate token (past the sinks, before the window blocks): per KV head, the max over the head's
   query heads of their softmax, so one KV head's selection serves every query head of its group;
2. `select_tokens`: the sinks plus the best-scored candidates, `K` per KV head (K = buffer slots);
3. `elastic_plan`: against what the buffer already holds, the tokens to bring in (selected now,
   not before) and the slots they go to (those whose token left the selection) — SpeContext's
   elastic loading: the selection changes little from step to step, and only the difference moves;
4. `load_into_buffer`: one layer's copies, keys and values and every per-token component.

Every target layer then reads the same reduced table, buffer blocks followed by the window blocks,
with its ordinary decode kernel (buffer slot s of KV head h holds a token head h chose; the heads'
slots are independent in the cache layout, and decode attention does not care where a key sits).
Checked against naive references in tests/attention/test_specontext_ops.py.
"""

from __future__ import annotations

import torch

from kvflow.attention.kv_spec import LayerKV


def retrieval_scores(q: torch.Tensor, keys: torch.Tensor, scale: float,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """q [..., KVH, G, D] (a token's retrieval queries), keys [..., L, KVH, D] (its candidates') ->
    [..., KVH, L] scores: per KV head, the max over its G query heads of softmax(q·k * scale). With a
    leading row dimension, `lengths` [R]: each row's candidates are its first lengths[r] keys (the rest
    padding, scored 0: left out of the softmax)."""
    logits = torch.einsum("...hgd,...lhd->...hgl", q.float(), keys.float()) * scale
    if lengths is not None:
        logits = logits.masked_fill(_padding(lengths, logits.shape[-1])[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).amax(dim=-2)


def _padding(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[R, width]: True past each row's length."""
    return torch.arange(width, device=lengths.device) >= lengths[:, None]


def select_tokens(scores: torch.Tensor, k: int, sink_tokens: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The K cache entries each KV head reads besides its window: the first `sink_tokens` entries
    always, then the best-scored others. `scores` [..., KVH, L] covers entries [0, L) (L >= K, sinks
    included; with a leading row dimension, row r's first `lengths[r]` only). Returns [..., KVH, K]
    entries, ascending."""
    length = scores.shape[-1] if lengths is None else int(lengths.min())
    if k > length:
        raise ValueError(f"cannot select {k} tokens among {length}")
    sinks = min(sink_tokens, k)
    ranked = scores.clone()
    ranked[..., :sinks] = float("inf")
    if lengths is not None:
        ranked.masked_fill_(_padding(lengths, scores.shape[-1])[:, None, :], float("-inf"))
    return ranked.topk(k, dim=-1).indices.sort(dim=-1).values


def elastic_plan(held: torch.Tensor | None, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """What moves into a buffer that holds `held` [KVH, K] (entry per slot, -1: empty; None: a new
    buffer) so that it holds the set `selected` [KVH, K]: the tokens selected and not held go to
    the slots whose entry is not selected, in order. Returns (heads, slots, entries) of the moves
    (1-D, equal length) and the buffer's new contents [KVH, K]."""
    held = torch.full_like(selected, -1) if held is None else held
    _, heads, slots, entries, contents = elastic_rows(held[None], selected[None])
    return heads, slots, entries, contents[0]


def elastic_rows(held: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`elastic_plan` for R buffers at once: held [R, KVH, K] (-1: empty), selected [R, KVH, K] (ascending).
    Returns (rows, heads, slots, entries) of the moves and the new contents [R, KVH, K]. A slot stays
    where its entry is selected (a binary search in the sorted selection); an entry arrives where no
    slot holds it (a search in the sorted buffer); the free slots of each (row, head), ascending, take
    its arriving entries, ascending."""
    k = selected.shape[-1]
    stays = selected.gather(-1, torch.searchsorted(selected, held).clamp(max=k - 1)) == held
    held_sorted = held.sort(dim=-1).values
    arrives = held_sorted.gather(-1, torch.searchsorted(held_sorted, selected).clamp(max=k - 1)) != selected
    assert torch.equal((~stays).sum(-1), arrives.sum(-1)), "a buffer holds K distinct entries and K are selected"
    rows, heads, slots = (~stays).nonzero(as_tuple=True)  # row-major: each (row, head)'s free slots ascending
    entries = selected[arrives]  # row-major too: each (row, head)'s arriving entries ascending
    contents = held.clone()
    contents[rows, heads, slots] = entries
    return rows, heads, slots, entries, contents


def load_into_buffer(kv_cache: LayerKV, heads: torch.Tensor, src_block: torch.Tensor, src_offset: torch.Tensor,
                     dst_block: torch.Tensor, dst_offset: torch.Tensor,
                     source: tuple[torch.Tensor, ...] | None = None) -> None:
    """One layer's moves (of any number of sequences at once): the token at (src_block[i],
    src_offset[i]) of KV head heads[i] into (dst_block[i], dst_offset[i]); keys and values and every
    per-token component (codes and their scales alike; per-head scales are shared). `source`: the
    per-token components to read from, in the cache's layout (the offload tier's); None: the cache."""
    if not len(heads):
        return
    parts = (kv_cache,) if isinstance(kv_cache, torch.Tensor) else tuple(kv_cache)
    per_token = [part for part in parts if part.dim() == 5]  # [2, blocks, KVH, bs, width]: stored per token
    for part, src in zip(per_token, per_token if source is None else source, strict=True):
        part[:, dst_block, heads, dst_offset] = src[:, src_block, heads, src_offset]


def buffer_moves(table: torch.Tensor, heads: torch.Tensor, slots: torch.Tensor, entries: torch.Tensor,
                 buffer_blocks: torch.Tensor, block_size: int,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Moves (`elastic_plan`'s heads, slots, entries) as cache coordinates for `load_into_buffer`:
    (heads, src_block, src_offset, dst_block, dst_offset). One sequence's: `table` [blocks] and
    `buffer_blocks` [n]; several (`elastic_rows`'s `rows`): their tables [R, blocks] and buffers [R, n]."""
    src, dst = (table[entries // block_size], buffer_blocks[slots // block_size]) if rows is None else \
        (table[rows, entries // block_size], buffer_blocks[rows, slots // block_size])
    return heads, src, entries % block_size, dst, slots % block_size


def reduced_table(buffer_blocks: torch.Tensor, table: torch.Tensor, num_entries: int, window_blocks: int,
                  block_size: int) -> tuple[torch.Tensor, int]:
    """The table a SpeContext decode reads: its buffer blocks, then its newest `window_blocks` blocks
    (the last holds the new token); and the context length over it."""
    nb = -(-num_entries // block_size)
    window = table[nb - window_blocks : nb]
    length = len(buffer_blocks) * block_size + num_entries - (nb - window_blocks) * block_size
    return torch.cat([buffer_blocks, window]), length
