"""Varlen causal prefill attention over the paged KV cache (FlashAttention-2 style, Triton).

Prefill chunks of many requests are packed flat. Each program owns one tile of BLOCK_M query
tokens of one sequence and one query head, and streams that sequence's keys/values through its
block table in tiles of BLOCK_N keys with the online-softmax recurrence, so the score matrix is
never materialised and a cached prefix costs nothing extra (its blocks are just read). Key tiles
wholly outside the causal / sliding-window range of the query tile are never visited, and those
wholly inside it (all but the diagonal and window-edge tiles) skip the mask. An int8 cache (INT8)
is read as codes, its scales folded into the scores and softmax weights; an fp8 cache (FP8) as
codes converted in registers, the kv head's key scale folded into the scores' scale and its value
scale into the output (_common.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.attention.kv_spec import LayerKV
from kvflow.attention.triton._common import (
    FP8,
    INT8,
    LOG2E,
    cache_pointers,
    check_inputs,
    codes_to,
    device_capability,
    fp8_native,
    load_head_scales,
    load_kv_tile,
    online_softmax_step,
    prefill_launch_config,
    tile_scores,
)


@triton.jit
def _attend_key_tiles(
    q, m_i, l_i, acc, start, end, hi, q_pos, kv_base, scale_base, bt_row, offs_d, block_size, window,
    stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff, qk_scale,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, INT8: tl.constexpr, FP8: tl.constexpr,
    FP8_NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Key tiles [start, end) of one query tile. Unmasked tiles (MASKED=False) are visible to every
    query of the tile, so they skip the causal/window mask and its [M, N] selects."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k, v, k_scale, v_scale = load_kv_tile(kv_base, scale_base, bt_row, offs_n, n_mask, offs_d, block_size,
                                              stride_ckv, stride_cblk, stride_coff,
                                              stride_skv, stride_sblk, stride_soff, INT8)
        s = tile_scores(q, k, k_scale, qk_scale, INT8, FP8, FP8_NATIVE, PRECISION)  # [M, N], log2 units
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
            if USE_WINDOW:
                visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, codes_to(v, q.dtype, FP8, FP8_NATIVE), v_scale, m_i, l_i, acc,
                                            INT8, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, out_ptr, lse_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
    cache_ptr, scale_ptr,
    stride_ckv, stride_cblk, stride_ch, stride_coff,
    stride_skv, stride_sblk, stride_sh, stride_soff,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh, stride_bt,
    qk_scale, block_size, window, first_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, USE_WINDOW: tl.constexpr, INT8: tl.constexpr,
    FP8: tl.constexpr, FP8_NATIVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:  # the grid is sized for the longest chunk; shorter ones idle
        seq_len = tl.load(seq_lens_ptr + seq)
        prefix = seq_len - q_len
        kv_head = head // GROUP
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        q_pos = prefix + offs_m  # absolute positions of this tile's queries
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None], other=0.0,
        )
        # Keys visible to any query of the tile: [lo, hi). Those in [full_lo, diag_lo) are visible
        # to all of its queries: before the first query's position (causal) and, with a window,
        # within the window of the last query.
        first_pos = prefix + tile * BLOCK_M
        hi = tl.minimum(first_pos + BLOCK_M, seq_len)
        diag_lo = (first_pos // BLOCK_N) * BLOCK_N
        lo = 0
        full_lo = 0
        if USE_WINDOW:
            lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N, diag_lo)
        kv_base = cache_ptr + kv_head * stride_ch
        scale_base = scale_ptr + kv_head * stride_sh
        k_head_scale, v_head_scale = load_head_scales(scale_base, stride_skv, FP8)
        if FP8:
            qk_scale = qk_scale * k_head_scale
        bt_row = bt_ptr + seq * stride_bt
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if USE_WINDOW:  # tiles at the window's lower edge
            m_i, l_i, acc = _attend_key_tiles(
                q, m_i, l_i, acc, lo, full_lo, hi, q_pos, kv_base, scale_base, bt_row, offs_d, block_size, window,
                stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff, qk_scale,
                MASKED=True, USE_WINDOW=USE_WINDOW, INT8=INT8, FP8=FP8, FP8_NATIVE=FP8_NATIVE, BLOCK_N=BLOCK_N,
                PRECISION=PRECISION,
            )
        m_i, l_i, acc = _attend_key_tiles(
            q, m_i, l_i, acc, full_lo, diag_lo, hi, q_pos, kv_base, scale_base, bt_row, offs_d, block_size, window,
            stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff, qk_scale,
            MASKED=False, USE_WINDOW=USE_WINDOW, INT8=INT8, FP8=FP8, FP8_NATIVE=FP8_NATIVE, BLOCK_N=BLOCK_N,
            PRECISION=PRECISION,
        )
        m_i, l_i, acc = _attend_key_tiles(  # tiles on the causal diagonal
            q, m_i, l_i, acc, diag_lo, hi, hi, q_pos, kv_base, scale_base, bt_row, offs_d, block_size, window,
            stride_ckv, stride_cblk, stride_coff, stride_skv, stride_sblk, stride_soff, qk_scale,
            MASKED=True, USE_WINDOW=USE_WINDOW, INT8=INT8, FP8=FP8, FP8_NATIVE=FP8_NATIVE, BLOCK_N=BLOCK_N,
            PRECISION=PRECISION,
        )
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if FP8:  # sum_j p_j (scale * code_j) = scale * sum_j p_j code_j
            out = out * v_head_scale
        tok = (q_start + offs_m).to(tl.int64)
        tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural log
        tl.store(lse_ptr + tok * stride_lt + head * stride_lh, lse, mask=m_mask)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: LayerKV,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    first_seq: int = 0,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention for sequences `first_seq..B-1` of the step, reading K/V through the cache.

    q: [T, num_heads, head_dim] (all tokens of the step; only those of the chosen sequences are
    computed). The new tokens' k/v must already be in the cache (`store_kv`); `kv_cache` is dense
    (q's dtype), an int8 (codes, scales) or an fp8 (codes, head_scales) pair. Returns (out [T, num_heads, head_dim], lse
    [T, num_heads] fp32, natural log); rows of other tokens are left as they were in `out`/`lse`
    (uninitialised if those were not given).
    `max_query_len` (host int) avoids a device sync when the caller already knows it.
    """
    num_tokens, num_heads, head_dim = q.shape
    q, kv, scales, kind, out, lse = check_inputs(q, kv_cache, out, lse)
    num_kv_heads = kv.shape[2]
    num_seqs = seq_lens.shape[0] - first_seq
    if num_seqs <= 0 or num_tokens == 0:
        return out, lse
    if max_query_len is None:
        max_query_len = int(torch.diff(query_start_loc[first_seq:]).max().item())
    if max_query_len <= 0:
        return out, lse
    capability = device_capability(q.device)
    config = prefill_launch_config(head_dim, q.dtype, capability, int8=kind == INT8, fp8=kind == FP8)
    block_m = block_m or config.block_m
    block_n = block_n or config.block_n
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        q, out, lse, query_start_loc, seq_lens, block_tables, *cache_pointers(kv, scales, kind),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), block_tables.stride(0),
        scale * LOG2E, kv.shape[3], sliding_window or 0, first_seq,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, USE_WINDOW=sliding_window is not None,
        INT8=kind == INT8, FP8=kind == FP8, FP8_NATIVE=kind == FP8 and fp8_native(capability),
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=config.precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse
