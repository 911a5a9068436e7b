"""The tensor work of KV policies, on the paged cache in place and for every KV format.

kvflow/core/kv_policy.py decides which sequence does what; these functions compute it:

- Quest: per block, the elementwise min and max of its keys (`update_key_bounds`, kept beside the
  cache) and, per decode query, the blocks with the largest bound on q·k (`quest_select`).
- SnapKV: the prompt tokens its observation window attends to most, per kv head
  (`snapkv_select`), and the copy of just those into fresh blocks (`compact_tokens`).
- H2O: the attention mass each block receives (`block_attention_mass`, the reference for
  backends whose kernels do not return it themselves).

Keys are read block by block in the format the cache holds (codes times scales), never a copy of a
whole sequence in another layout; a policy's choices are checked against naive full-matrix
references in tests/attention/test_kv_policy_ops.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvflow.attention.kv_quant import dequantize_fp8, dequantize_int8
from kvflow.attention.kv_spec import LayerKV

#: SnapKV pools the window's votes over neighbouring tokens so whole phrases are kept (kernel 5,
#: the paper's setting).
SNAPKV_POOL_KERNEL = 5


def read_keys(kv_cache: LayerKV, blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keys of `blocks` (any shape of block ids) as [..., kv_heads, block_size, head_dim] in `dtype`."""
    if isinstance(kv_cache, torch.Tensor):
        return kv_cache[0][blocks].to(dtype)
    codes, scales = kv_cache
    if codes.dtype == torch.int8:
        return dequantize_int8(codes[0][blocks], scales[0][blocks], dtype)
    return dequantize_fp8(codes[0][blocks], scales[0][:, None], dtype)


def read_slot_keys(kv_cache: LayerKV, slot_block: torch.Tensor, slot_offset: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """Keys at the given slots, as stored, [T, kv_heads, head_dim] in `dtype`."""
    if isinstance(kv_cache, torch.Tensor):
        return kv_cache[0][slot_block, :, slot_offset].to(dtype)
    codes, scales = kv_cache
    if codes.dtype == torch.int8:
        return dequantize_int8(codes[0][slot_block, :, slot_offset], scales[0][slot_block, :, slot_offset], dtype)
    return dequantize_fp8(codes[0][slot_block, :, slot_offset], scales[0][None], dtype)


# ---------------------------------------------------------------------------------------- Quest
def allocate_key_bounds(num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        device: torch.device | str) -> list[torch.Tensor]:
    """Per layer [num_blocks, kv_heads, 2 (min, max), head_dim]: a block's bounds are contiguous, so
    scoring a block is one short read; they are reset when the block's first slot is written."""
    return [torch.zeros(num_blocks, num_kv_heads, 2, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)]


#: (bounds, keys [T, KVH, D], slot_block, slot_offset) -> None: `fold_key_bounds`, or the C++ kernel.
FoldFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def update_key_bounds(key_bounds: list[torch.Tensor], kv_caches: list[LayerKV], slot_mapping: torch.Tensor,
                      block_size: int, fold: FoldFn | None = None) -> None:
    """Fold the keys just stored at `slot_mapping`, as the cache holds them, into their blocks'
    min/max in every layer. Blocks fill in order, so a block whose offset 0 is written starts over
    (it was free, or is being recomputed)."""
    slot_block = torch.div(slot_mapping, block_size, rounding_mode="floor")
    slot_offset = slot_mapping % block_size
    for bounds, kv_cache in zip(key_bounds, kv_caches):
        keys = read_slot_keys(kv_cache, slot_block, slot_offset, bounds.dtype).contiguous()  # [T, KVH, D]
        (fold or fold_key_bounds)(bounds, keys, slot_block, slot_offset)


def fold_key_bounds(bounds: torch.Tensor, keys: torch.Tensor, slot_block: torch.Tensor,
                    slot_offset: torch.Tensor) -> None:
    """Fold one layer's keys into their blocks' min/max (the reference for the C++ kernel)."""
    # Only the step's blocks are touched: gathered, folded, written back (never the whole table).
    blocks, inverse = torch.unique(slot_block, return_inverse=True)
    mins, maxs = bounds[blocks, :, 0], bounds[blocks, :, 1]  # [U, KVH, D] copies
    fresh = torch.zeros(len(blocks), dtype=torch.bool, device=blocks.device)
    fresh[inverse[slot_offset == 0]] = True
    mins[fresh], maxs[fresh] = float("inf"), float("-inf")
    index = inverse[:, None, None].expand_as(keys)
    mins.scatter_reduce_(0, index, keys, "amin")
    maxs.scatter_reduce_(0, index, keys, "amax")
    bounds[blocks] = torch.stack([mins, maxs], dim=2)


#: (q [R, H, D], bounds [blocks, KVH, 2, D], tables [R, nb], num_blocks [R], scale) -> [R, H, nb] fp32: Quest's scaled
#: bound per block and query head, -inf past a row's blocks (`quest_bounds`, or the C++ kernel's).
BoundsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def quest_bounds(q: torch.Tensor, bounds: torch.Tensor, tables: torch.Tensor, num_blocks: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Quest's upper bound Σ_d max(q_d·min_d, q_d·max_d) on any q·k of each block, per query head,
    times `scale`: [R, H, nb] fp32, -inf past a row's `num_blocks` (the C++ CPU kernel
    `quest_bounds` computes the same, reading the bounds in place)."""
    r, num_heads, head_dim = q.shape
    kvh = bounds.shape[1]
    qg = q.float().view(r, kvh, num_heads // kvh, head_dim)
    # One matmul: [q⁺, q⁻] · [max, min] over 2·D is Σ_d max(q_d·min_d, q_d·max_d).
    both = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], dim=-1)  # [R, KVH, G, 2D]
    mm = bounds[tables].float().permute(0, 2, 3, 4, 1).flip(2)  # [R, KVH, 2 (max, min), D, nb]
    upper = torch.matmul(both, mm.reshape(r, kvh, 2 * head_dim, -1)).view(r, num_heads, -1) * scale
    valid = torch.arange(tables.shape[1], device=tables.device)[None, :] < num_blocks[:, None]  # [R, nb]
    return upper.masked_fill(~valid[:, None, :], float("-inf"))


def quest_scores(q: torch.Tensor, bounds: torch.Tensor, tables: torch.Tensor, num_blocks: torch.Tensor,
                 scale: float, bounds_fn: BoundsFn = quest_bounds) -> torch.Tensor:
    """How much each block may matter to each decode query: per query head, Quest's bound
    softmaxed over the blocks (an estimate of the attention mass the block could take), summed over
    heads: one score per block [R, nb], -inf past a row's `num_blocks`. One block table serves all
    heads, so blocks are chosen per sequence, not per head as in the paper."""
    upper = bounds_fn(q, bounds, tables, num_blocks, scale)
    valid = torch.arange(tables.shape[1], device=tables.device)[None, :] < num_blocks[:, None]
    return torch.softmax(upper, dim=-1).sum(1).masked_fill(~valid, float("-inf"))


#: quest_select's signature: the PyTorch reference below, or the C++ CPU kernel (CpuForward.quest_select).
SelectFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int], list[int], list[int], int,
                     float], tuple[torch.Tensor, list[int]]]


def quest_select(q: torch.Tensor, bounds: torch.Tensor, tables: torch.Tensor, kv_lens: list[int],
                 read_blocks: list[int], sink_blocks: list[int], window_blocks: list[int], block_size: int,
                 scale: float, bounds_fn: BoundsFn = quest_bounds) -> tuple[torch.Tensor, list[int]]:
    """The blocks each decode row reads this layer: its sink blocks, its newest `window_blocks`
    (always the one holding the query) and the best-scored others, `read_blocks` in all, in table
    order. Returns the rows' reduced tables [R, max read] and context lengths over them."""
    device = tables.device
    n_blocks = torch.tensor([-(-n // block_size) for n in kv_lens], device=device)
    scores = quest_scores(q, bounds, tables, n_blocks, scale, bounds_fn)
    cols = torch.arange(tables.shape[1], device=device)[None, :]
    forced = (cols < torch.tensor(sink_blocks, device=device)[:, None]) | (
        cols >= (n_blocks - torch.tensor(window_blocks, device=device).clamp(min=1))[:, None])
    scores = torch.where(forced & (cols < n_blocks[:, None]), torch.inf, scores)
    k = [min(b, int(n)) for b, n in zip(read_blocks, n_blocks.tolist())]
    top = torch.topk(scores, max(k), dim=-1).indices
    top = top.masked_fill(torch.arange(max(k), device=device)[None, :] >= torch.tensor(k, device=device)[:, None],
                          tables.shape[1])
    top = top.sort(dim=-1).values  # chosen blocks in table order (the query's block last), padding after
    chosen = tables.gather(1, top.clamp(max=tables.shape[1] - 1))
    lens = [(kr - 1) * block_size + n - (int(nb) - 1) * block_size for kr, n, nb in zip(k, kv_lens, n_blocks.tolist())]
    return chosen, lens


# ---------------------------------------------------------------------------------------- SnapKV
def snapkv_select(q_window: torch.Tensor, kv_cache: LayerKV, table: torch.Tensor, kv_len: int, budget: int,
                  scale: float, keys: torch.Tensor | None = None) -> torch.Tensor:
    """The prompt tokens one sequence keeps in one layer: per kv head, the `budget - W` earlier tokens
    its last W queries (`q_window` [W, heads, D], the prompt's end) attend to most, pooled over
    neighbours and summed over the heads of a group, plus the W window tokens themselves.
    Returns [kv_heads, budget] cache indices, ascending. `keys` [kv_heads, kv_len, D]: the sequence's
    keys already read (KIVI's, from blocks and ring), instead of reading them from `table`."""
    w, num_heads, head_dim = q_window.shape
    if keys is None:
        bs = (kv_cache if isinstance(kv_cache, torch.Tensor) else kv_cache[0]).shape[3]
        nb = -(-kv_len // bs)
        keys = read_keys(kv_cache, table[:nb])  # [nb, KVH, bs, D]
        keys = keys.transpose(0, 1).reshape(keys.shape[1], nb * bs, head_dim)[:, :kv_len]
    kvh = keys.shape[0]
    qg = q_window.float().view(w, kvh, num_heads // kvh, head_dim).permute(1, 2, 0, 3)  # [KVH, G, W, D]
    scores = torch.matmul(qg, keys[:, None].transpose(-1, -2)) * scale  # [KVH, G, W, L]
    q_pos = torch.arange(kv_len - w, kv_len, device=scores.device)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len, device=scores.device)[None, :] > q_pos, float("-inf"))
    votes = torch.softmax(scores, dim=-1)[..., : kv_len - w].sum(2)  # [KVH, G, L - W]
    pooled = F.avg_pool1d(votes, SNAPKV_POOL_KERNEL, stride=1, padding=SNAPKV_POOL_KERNEL // 2,
                          count_include_pad=False).sum(1)  # [KVH, L - W]
    keep = torch.topk(pooled, budget - w, dim=-1).indices.sort(dim=-1).values
    window = torch.arange(kv_len - w, kv_len, device=keep.device).expand(kvh, w)
    return torch.cat([keep, window], dim=1)


def compact_tokens(kv_cache: LayerKV, table: torch.Tensor, keep: torch.Tensor, dest: torch.Tensor) -> None:
    """Copy each kv head's kept tokens (`keep` [kv_heads, n] cache indices through `table`) to the
    first n slots of the `dest` blocks, keys and values, every per-token component (codes and
    their scales alike; per-head scales stay as they are)."""
    parts = (kv_cache,) if isinstance(kv_cache, torch.Tensor) else tuple(kv_cache)
    bs = parts[0].shape[3]
    kvh, n = keep.shape
    head = torch.arange(kvh, device=keep.device)[:, None]
    src_block, src_off = table[keep // bs], keep % bs
    slots = torch.arange(n, device=keep.device)[None, :]
    dst_block, dst_off = dest[slots // bs], slots % bs
    for part in parts:
        if part.dim() == 5:  # [2, blocks, KVH, bs, width]: stored per token
            part[:, dst_block, head, dst_off] = part[:, src_block, head, src_off]


# ------------------------------------------------------------------------------------------- H2O
#: block_attention_mass's signature: the PyTorch reference below, or the C++ CPU kernel (CpuForward.block_mass).
MassFn = Callable[[torch.Tensor, LayerKV, torch.Tensor, list[int], float], torch.Tensor]


def block_attention_mass(q: torch.Tensor, kv_cache: LayerKV, tables: torch.Tensor, kv_lens: list[int],
                         scale: float) -> torch.Tensor:
    """The attention mass each block of each decode row takes, summed over query heads: [R, nb].
    The reference for the C++ kernel (`block_mass`, which reads the cache in place) and for backends
    that do not return it from their kernels (torch-native does); it dequantises the rows' keys."""
    r, num_heads, head_dim = q.shape
    keys = read_keys(kv_cache, tables)  # [R, nb, KVH, bs, D]
    _, nb, kvh, bs, _ = keys.shape
    scores = torch.matmul(q.float().view(r, 1, kvh, num_heads // kvh, head_dim), keys.transpose(-1, -2))
    scores = scores.permute(0, 2, 3, 1, 4).reshape(r, kvh, num_heads // kvh, nb * bs) * scale
    visible = torch.arange(nb * bs, device=q.device)[None, :] < torch.tensor(kv_lens, device=q.device)[:, None]
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None, :], float("-inf")), dim=-1)
    return probs.sum((1, 2)).view(r, nb, bs).sum(-1)
