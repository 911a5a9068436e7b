"""Paged decode attention with flash-decoding (split-KV), Triton.

A decode has one query token per sequence, so one program per (sequence, head) leaves most of a
GPU idle on long contexts. Kernel 1 therefore also splits each context into `num_splits` chunks:
grid (sequence, kv head, split), and each program serves ALL query heads of its GQA group, so
the group shares every K/V load (the group is padded to >= 16 rows for tl.dot). It writes a
partial, normalised output and its log2-sum-exp per split to fp32 scratch; kernel 2 merges the
splits by their LSE. With one split, kernel 1 writes the final output directly (no scratch, no
merge): the "non-split" variant. The split count is a runtime argument, not a constexpr, so a
server whose batch and context lengths change every step does not compile a kernel per count
(the merge compiles one per power of two). Shared-prefix groups (kvflow/attention/shared_prefix.py:
decodes whose tables start with the same blocks) add a kernel over (group, kv head, shared split)
that reads the shared keys once for all members' query heads, stacked as rows of one tile, and
writes each member's partial result to extra split slots; each member's own splits then cover only
the keys after the shared run, and kernel 2 merges both. An int8 cache (INT8) is read as codes, its scales
folded into the scores and softmax weights; an fp8 cache (FP8) as codes converted in registers,
its kv head's key scale folded into the scores' scale and its value scale into the (partial)
output (_common.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.attention.kv_spec import LayerKV
from kvflow.attention.shared_prefix import SharedPrefixGroups
from kvflow.attention.triton._common import (
    FP8,
    INT8,
    LOG2E,
    cache_pointers,
    check_inputs,
    codes_to,
    decode_launch_config,
    device_capability,
    fp8_native,
    load_head_scales,
    load_kv_tile,
    multiprocessor_count,
    online_softmax_step,
    tile_scores,
)


@triton.jit
def _attend_keys(
    q, kv_base, scale_base, bt_row, start, end, offs_d, qk_scale, v_head_scale, block_size,
    stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INT8: tl.constexpr, FP8: tl.constexpr,
    FP8_NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """The query rows `q` [ROWS, D] over keys [start, end) of the table row `bt_row`, all visible: the
    normalised output [ROWS, D] and its log2-sum-exp [ROWS]. An empty range gives out 0 and lse -inf,
    which weighs nothing in the merge (both decode kernels' partial results)."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        k, v, k_scale, v_scale = load_kv_tile(
            kv_base, scale_base, bt_row, offs_n, n_mask, offs_d, block_size,
            stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff, INT8,
        )
        s = tile_scores(q, k, k_scale, qk_scale, INT8, FP8, FP8_NATIVE, PRECISION)  # [ROWS, N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, codes_to(v, q.dtype, FP8, FP8_NATIVE), v_scale, m_i, l_i, acc,
                                            INT8, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if FP8:  # sum_j p_j (scale * code_j) = scale * sum_j p_j code_j
        out = out * v_head_scale
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    return out, lse


@triton.jit
def _decode_split_kernel(
    q_ptr, out_ptr, lse_ptr, seq_lens_ptr, bt_ptr, key_start_ptr,
    cache_ptr, scale_ptr,
    stride_ckv, stride_cblk, stride_ch, stride_coff,
    stride_skv, stride_sblk, stride_sh, stride_soff,
    stride_qt, stride_qh,
    stride_ob, stride_oh, stride_os,  # out: [B, H, (S,) D]
    stride_lb, stride_lh, stride_ls,  # lse: [B, H, (S)]
    stride_bt, qk_scale, block_size, window, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr, LSE_NATURAL: tl.constexpr, INT8: tl.constexpr, FP8: tl.constexpr,
    FP8_NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SHARED: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    if SHARED:  # a shared-prefix member's own keys follow its group's shared run (0: not a member)
        lo = tl.load(key_start_ptr + seq)
    # This split's chunk of the visible keys [lo, seq_len), a whole number of key tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    kv_base = cache_ptr + kv_head * stride_ch
    scale_base = scale_ptr + kv_head * stride_sh
    k_head_scale, v_head_scale = load_head_scales(scale_base, stride_skv, FP8)
    if FP8:
        qk_scale = qk_scale * k_head_scale
    out, lse = _attend_keys(  # an empty split (short context): out 0, lse -inf
        q, kv_base, scale_base, bt_ptr + seq * stride_bt, start, end, offs_d, qk_scale, v_head_scale, block_size,
        stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff,
        BLOCK_G, HEAD_DIM, INT8, FP8, FP8_NATIVE, BLOCK_N, PRECISION,
    )
    if LSE_NATURAL:
        lse = lse * 0.6931471805599453
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


@triton.jit
def _decode_shared_kernel(
    q_ptr, out_ptr, lse_ptr, groups_ptr, members_ptr, bt_ptr,
    cache_ptr, scale_ptr,
    stride_ckv, stride_cblk, stride_ch, stride_coff,
    stride_skv, stride_sblk, stride_sh, stride_soff,
    stride_qt, stride_qh,
    stride_ob, stride_oh, stride_os,  # out: [B, H, S, D]
    stride_lb, stride_lh, stride_ls,  # lse: [B, H, S]
    stride_bt, qk_scale, block_size, num_splits, first_slot,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, INT8: tl.constexpr, FP8: tl.constexpr,
    FP8_NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One shared-prefix group's shared keys for one kv head: row r of the tile is member r // GROUP's
    query head r % GROUP, so each K/V tile, loaded once, serves every member. Writes each member's
    partial output and log2-sum-exp to split slot `first_slot` + split (all keys are visible to all
    members: the shared run ends before each member's position)."""
    group = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(groups_ptr + 3 * group)
    count = tl.load(groups_ptr + 3 * group + 1) - first
    keys = tl.load(groups_ptr + 3 * group + 2) * block_size
    chunk = tl.cdiv(tl.cdiv(keys, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, keys)

    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < count * GROUP
    seqs = tl.load(members_ptr + first + offs_r // GROUP, mask=r_mask, other=0)
    heads = kv_head * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seqs[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None], other=0.0)
    bt_row = bt_ptr + tl.load(members_ptr + first) * stride_bt  # every member's table starts with these blocks
    kv_base = cache_ptr + kv_head * stride_ch
    scale_base = scale_ptr + kv_head * stride_sh
    k_head_scale, v_head_scale = load_head_scales(scale_base, stride_skv, FP8)
    if FP8:
        qk_scale = qk_scale * k_head_scale
    out, lse = _attend_keys(
        q, kv_base, scale_base, bt_row, start, end, offs_d, qk_scale, v_head_scale, block_size,
        stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff,
        BLOCK_R, HEAD_DIM, INT8, FP8, FP8_NATIVE, BLOCK_N, PRECISION,
    )
    slot = first_slot + split
    tl.store(out_ptr + seqs[:, None] * stride_ob + heads[:, None] * stride_oh + slot * stride_os + offs_d[None, :],
             out, mask=r_mask[:, None])
    tl.store(lse_ptr + seqs * stride_lb + heads * stride_lh + slot * stride_ls, lse, mask=r_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
    stride_ot, stride_oh, stride_lt, stride_lh, num_splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + seq * stride_plb + head * stride_plh + offs_s, mask=s_mask,
                  other=float("-inf"))  # log2 units
    part = tl.load(part_out_ptr + seq * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps
                   + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    lse_max = tl.max(lse, 0)  # finite: a context has at least one key
    w = tl.exp2(lse - lse_max)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / total
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + seq * stride_lt + head * stride_lh, (lse_max + tl.log2(total)) * 0.6931471805599453)


def default_num_splits(max_seq_len: int, num_seqs: int = 1, num_kv_heads: int = 1,
                       multiprocessors: int | None = None, min_chunk: int = 256, max_splits: int = 64) -> int:
    """How many chunks to split each context into.

    On a GPU (`multiprocessors` known): enough that the (sequence, kv head, split) programs fill
    every multiprocessor about four times over, so a small batch of long contexts still streams
    K/V from all of them; never chunks under `min_chunk` keys (below that, the merge and the
    partial writes cost more than the parallelism gains). Without it (the interpreter): one split
    per `min_chunk` keys, at most 16.
    """
    by_length = max(1, triton.cdiv(max_seq_len, min_chunk))
    if multiprocessors is None:
        return min(16, by_length)
    wanted = triton.cdiv(4 * multiprocessors, max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, by_length, max_splits))


def decode_attention(
    q: torch.Tensor,
    kv_cache: LayerKV,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    *,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_n: int | None = None,
    shared: SharedPrefixGroups | None = None,
    key_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per sequence (q: [B, num_heads, head_dim], row b = sequence b of
    `seq_lens`/`block_tables`, whose keys include the query's own, already stored by `store_kv`).
    `kv_cache`: the layer's cache, dense (q's dtype), an int8 (codes, scales) or an fp8 (codes,
    head_scales) pair.

    Returns (out [B, num_heads, head_dim], lse [B, num_heads] fp32, natural log). `num_splits=None`
    picks `default_num_splits` for this batch and device; `max_seq_len` (host int) avoids a device
    sync. `shared`: shared-prefix groups among these sequences (no sliding window), whose shared
    keys are read once per group; `key_starts` is `own_key_starts` of them, if already made.
    """
    num_seqs, num_heads, head_dim = q.shape
    q, kv, scales, kind, out, lse = check_inputs(q, kv_cache, out, lse)
    num_kv_heads = kv.shape[2]
    if num_seqs == 0:
        return out, lse
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens[:num_seqs].max().item())
        num_splits = default_num_splits(max_seq_len, num_seqs, num_kv_heads, multiprocessor_count(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    group = num_heads // num_kv_heads
    capability = device_capability(q.device)
    config = decode_launch_config(head_dim, q.dtype, capability)
    common = dict(  # the split and the shared-prefix kernels'
        GROUP=group, HEAD_DIM=head_dim, INT8=kind == INT8, FP8=kind == FP8,
        FP8_NATIVE=kind == FP8 and fp8_native(capability), BLOCK_N=block_n or config.block_n,
        PRECISION=config.precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    split_opts = dict(common, BLOCK_G=max(16, triton.next_power_of_2(group)), USE_WINDOW=sliding_window is not None)
    cache_args = cache_pointers(kv, scales, kind)
    scalars = (block_tables.stride(0), scale * LOG2E, kv.shape[3], sliding_window or 0, num_splits)
    grid = (num_seqs, num_kv_heads, num_splits)
    if shared is not None and sliding_window is not None:
        raise ValueError("shared-prefix groups need full attention (no sliding window)")
    if shared is not None and key_starts is None:
        key_starts = own_key_starts(shared, num_seqs, kv.shape[3])
    starts = key_starts if shared is not None else seq_lens  # not read without groups
    if num_splits == 1 and shared is None:  # write the final result directly
        _decode_split_kernel[grid](
            q, out, lse, seq_lens, block_tables, starts, *cache_args,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), 0, lse.stride(0), lse.stride(1), 0,
            *scalars, LSE_NATURAL=True, SHARED=False, **split_opts,
        )
        return out, lse
    shared_splits = 0
    if shared is not None:
        shared_splits = default_num_splits(shared.max_shared_blocks * kv.shape[3], shared.num_groups, num_kv_heads,
                                           multiprocessor_count(q.device))
    total = num_splits + shared_splits
    part_out = torch.empty(num_seqs, num_heads, total, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, total, dtype=torch.float32, device=q.device)
    _decode_split_kernel[grid](
        q, part_out, part_lse, seq_lens, block_tables, starts, *cache_args,
        q.stride(0), q.stride(1), part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        *scalars, LSE_NATURAL=False, SHARED=shared is not None, **split_opts,
    )
    if shared is not None:
        # Sequences outside every group weigh nothing in the shared slots; members' are written below.
        part_out[:, :, num_splits:].zero_()
        part_lse[:, :, num_splits:].fill_(float("-inf"))
        # Rows: every member's query heads; twice the warps from 64 rows of 64 (else registers spill).
        block_r = max(16, triton.next_power_of_2(shared.max_members * group))
        _decode_shared_kernel[(shared.num_groups, num_kv_heads, shared_splits)](
            q, part_out, part_lse, shared.groups, shared.members, block_tables, *cache_args,
            q.stride(0), q.stride(1), part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            block_tables.stride(0), scale * LOG2E, kv.shape[3], shared_splits, num_splits,
            BLOCK_R=block_r, **dict(common, num_warps=8 if block_r * head_dim >= 4096 else config.num_warps),
        )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, lse,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), total,
        BLOCK_S=triton.next_power_of_2(total), HEAD_DIM=head_dim,
    )
    return out, lse


def own_key_starts(shared: SharedPrefixGroups, num_seqs: int, block_size: int) -> torch.Tensor:
    """[num_seqs] int64: where each decode's own keys start, after its group's shared run (0: in no
    group). Made on the groups' device without a sync (the backend makes it once per step)."""
    starts = torch.zeros(num_seqs, dtype=torch.long, device=shared.members.device)
    counts = shared.groups[:, 1] - shared.groups[:, 0]
    starts[shared.members] = torch.repeat_interleave(shared.groups[:, 2] * block_size, counts,
                                                     output_size=shared.members.numel())
    return starts
