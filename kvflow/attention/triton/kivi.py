"""KIVI (`--kv-cache-dtype kivi4|kivi2`) attention in Triton: flash-decoding and varlen prefill that
read the 4- or 2-bit blocks in place, dequantising in registers (kvflow/attention/kivi.py has the
format and the PyTorch reference, `kivi_attention`, that these kernels reproduce).

A query of a sequence whose chunk is [start, n) attends to three runs of keys, each read from
where it lives, with no copy of the sequence's cache:

- positions [0, Q) (Q: `KiviStep.quantised`, before the step) from the blocks, through the block
  table, one 32-token key group per tile (`_attend_blocks`): its packed codes [32, D * bits / 8]
  are loaded once and split into their channels (`unpack_codes`: shifts, masks and a join of the
  parts, low bits first), then keys are `code * scale + zero` with the fp16 scale and zero of
  their channel (one [D] row per group), values with those of their token and 32-channel group,
  in fp32, cast to q's dtype: the values `kivi.dequantize_blocks` gives;
- positions [Q, start) from the sequence's residual ring (position p at ring row p % W);
- the chunk's own positions [start, n) from the step's k, v (causal), as computed.

A sliding window limits all three to the query's last `window` positions. Attention runs before
the step's store (`kivi.store_kivi`, PyTorch), which reads the ring rows a chunk's groups
quantise; the backend calls it after these kernels, as the torch backend does.

Decode (one query per sequence) is split-K like decode.py: grid (sequence, kv head, split), all
query heads of a GQA group in one program so they share each dequantised tile, partial outputs
merged by their log-sum-exp with decode.py's merge kernel. Prefill is FlashAttention-2 like
prefill.py: one program per (sequence, BLOCK_M query tile, query head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.attention.kivi import KIVI_GROUP, KiviStep
from kvflow.attention.triton._common import (
    LOG2E,
    SUPPORTED_DTYPES,
    check_head_dim,
    decode_launch_config,
    device_capability,
    multiprocessor_count,
    online_softmax_step,
    prefill_launch_config,
)
from kvflow.attention.triton.decode import _decode_merge_kernel, default_num_splits

KiviCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (codes, meta, ring)

# Where a run of dense keys is read from (the `SOURCE` of `_attend_run`).
RING, OWN = 1, 2


@triton.jit
def unpack_codes(packed, BITS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Packed codes [N, HEAD_DIM * BITS / 8] (uint8, low bits first) -> codes [N, HEAD_DIM] (int32):
    kivi4's channel 2i is byte i's low nibble, 2i + 1 its high one; kivi2's channel 4i + j is bits
    2j..2j+1 of byte i. `tl.join` puts the parts of a byte next to each other, in channel order."""
    x = packed.to(tl.int32)
    if BITS == 4:
        c = tl.join(x & 15, x >> 4)  # [N, D/2, 2]: (2i, 2i + 1)
    else:
        # part j = bits 2j..2j+1; join(join(p0, p2), join(p1, p3))[.., i, a, b] = p(2a + b): channel 4i + 2a + b
        c = tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, x >> 6))  # [N, D/4, 2, 2]
    return tl.reshape(c, (BLOCK_N, HEAD_DIM))


@triton.jit
def _attend_blocks(
    q, m_i, l_i, acc, run_lo, run_hi, q_pos, offs_d, qk_scale, window,
    codes_base, meta_base, bt_row, block_size, stride_ckv, stride_cblk, stride_coff, stride_mkv, stride_mblk,
    USE_WINDOW: tl.constexpr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """The quantised key positions [run_lo, run_hi) (run_hi <= Q, a multiple of 32) of one sequence and
    kv head, one 32-token key group per tile (tiles aligned to the groups, positions below run_lo
    masked): a group lies in one block and has one scale and zero per channel, so a tile's key meta
    is two [D] rows (read once per group, not per token), and its keys are dequantised in
    registers as `kivi.dequantize_blocks` does (fp32, then q's dtype). Values are too, with a scale
    and zero per token and 32 channels. (Folding the key scales into q instead, (q * scale) . code
    + q . zero, used more registers in ptxas's report and rounds otherwise than the reference.)"""
    offs_t = tl.arange(0, 32)
    offs_c = tl.arange(0, HEAD_DIM * BITS // 8)
    for start_n in range(run_lo - run_lo % 32, run_hi, 32):
        offs_n = start_n + offs_t
        n_mask = (offs_n >= run_lo) & (offs_n < run_hi)
        blk = tl.load(bt_row + start_n // block_size).to(tl.int64)  # the whole group is below Q: no mask
        slot0 = start_n % block_size
        code_ptrs = codes_base + blk * stride_cblk + ((slot0 + offs_t) * stride_coff)[:, None] + offs_c[None, :]
        k_codes = unpack_codes(tl.load(code_ptrs), BITS, 32, HEAD_DIM)
        v_codes = unpack_codes(tl.load(code_ptrs + stride_ckv), BITS, 32, HEAD_DIM)
        meta = meta_base + blk * stride_mblk
        k_meta = meta + (slot0 // 32) * (2 * HEAD_DIM) + offs_d
        k_scale = tl.load(k_meta).to(tl.float32)
        k_zero = tl.load(k_meta + HEAD_DIM).to(tl.float32)
        k = (k_codes.to(tl.float32) * k_scale[None, :] + k_zero[None, :]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = n_mask[None, :]
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        v_meta = (meta + stride_mkv + (slot0 + offs_t) * (HEAD_DIM // 16))[:, None] + (offs_d // 32)[None, :]
        v_scale = tl.load(v_meta).to(tl.float32)
        v_zero = tl.load(v_meta + HEAD_DIM // 32).to(tl.float32)
        v = (v_codes.to(tl.float32) * v_scale + v_zero).to(q.dtype)
        m_i, l_i, acc = online_softmax_step(s, v, v, m_i, l_i, acc, False, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _attend_run(
    q, m_i, l_i, acc, run_lo, run_hi, q_pos, offs_d, qk_scale, window,
    ring_base, stride_rkv, stride_roff, ring_window, own_k, own_v, own_first, start, stride_kt,
    SOURCE: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """The dense key positions [run_lo, run_hi) of one sequence and kv head, all read from one place
    (SOURCE: RING, or OWN: the step's k/v, whose row `own_first` is position `start`), for the
    queries at positions `q_pos` (CAUSAL: mask keys after a query; USE_WINDOW: keys at or before
    q_pos - window)."""
    for start_n in range(run_lo, run_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < run_hi
        if SOURCE == 1:
            ptrs = ring_base + ((offs_n % ring_window) * stride_roff)[:, None] + offs_d[None, :]
            k = tl.load(ptrs, mask=n_mask[:, None], other=0.0).to(q.dtype)
            v = tl.load(ptrs + stride_rkv, mask=n_mask[:, None], other=0.0).to(q.dtype)
        else:
            rows = (own_first + offs_n - start).to(tl.int64)
            k = tl.load(own_k + (rows * stride_kt)[:, None] + offs_d[None, :], mask=n_mask[:, None],
                        other=0.0).to(q.dtype)
            v = tl.load(own_v + (rows * stride_kt)[:, None] + offs_d[None, :], mask=n_mask[:, None],
                        other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N], log2 units
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, v, m_i, l_i, acc, False, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _kivi_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seq_lens_ptr, quantised_ptr, slots_ptr, bt_ptr,
    codes_ptr, meta_ptr, ring_ptr,
    stride_ckv, stride_cblk, stride_ch, stride_coff,
    stride_mkv, stride_mblk, stride_mh,
    stride_rkv, stride_rslot, stride_rh, stride_roff,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_ob, stride_oh, stride_os,  # out: [B, H, (S,) D]
    stride_lb, stride_lh, stride_ls,  # lse: [B, H, (S)]
    stride_bt, qk_scale, block_size, ring_window, window, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, LSE_NATURAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    quantised = tl.load(quantised_ptr + seq)
    ring_slot = tl.load(slots_ptr + seq)
    start = seq_len - 1  # the query's own position
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    # This split's chunk of the visible keys [lo, seq_len), a whole number of key tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    split_lo = lo + split * chunk
    split_hi = tl.minimum(split_lo + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    q_pos = tl.full([BLOCK_G], 0, tl.int64) + start
    codes_base = codes_ptr + kv_head * stride_ch
    meta_base = meta_ptr + kv_head * stride_mh
    ring_base = ring_ptr + ring_slot * stride_rslot + kv_head * stride_rh
    own_k = k_ptr + kv_head * stride_kh
    own_v = v_ptr + kv_head * stride_kh
    bt_row = bt_ptr + seq * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    # The split's keys are all visible (window included: they are >= lo), so no run is masked.
    m_i, l_i, acc = _attend_blocks(
        q, m_i, l_i, acc, split_lo, tl.minimum(split_hi, quantised), q_pos, offs_d, qk_scale, window,
        codes_base, meta_base, bt_row, block_size, stride_ckv, stride_cblk, stride_coff, stride_mkv, stride_mblk,
        USE_WINDOW=False, BITS=BITS, HEAD_DIM=HEAD_DIM, PRECISION=PRECISION,
    )
    m_i, l_i, acc = _attend_run(
        q, m_i, l_i, acc, tl.maximum(split_lo, quantised), tl.minimum(split_hi, start), q_pos, offs_d, qk_scale,
        window, ring_base, stride_rkv, stride_roff, ring_window, own_k, own_v, seq, start, stride_kt,
        SOURCE=1, CAUSAL=False, USE_WINDOW=False, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, PRECISION=PRECISION,
    )
    m_i, l_i, acc = _attend_run(
        q, m_i, l_i, acc, tl.maximum(split_lo, start), split_hi, q_pos, offs_d, qk_scale, window,
        ring_base, stride_rkv, stride_roff, ring_window, own_k, own_v, seq, start, stride_kt,
        SOURCE=2, CAUSAL=False, USE_WINDOW=False, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, PRECISION=PRECISION,
    )
    # An empty split (short context) stores out = 0, lse = -inf: it weighs nothing in the merge.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    if LSE_NATURAL:
        lse = lse * 0.6931471805599453
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


@triton.jit
def _kivi_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, qsl_ptr, seq_lens_ptr, quantised_ptr, slots_ptr, bt_ptr,
    codes_ptr, meta_ptr, ring_ptr,
    stride_ckv, stride_cblk, stride_ch, stride_coff,
    stride_mkv, stride_mblk, stride_mh,
    stride_rkv, stride_rslot, stride_rh, stride_roff,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_lt, stride_lh, stride_bt,
    qk_scale, block_size, ring_window, window, first_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, USE_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:  # the grid is sized for the longest chunk; shorter ones idle
        seq_len = tl.load(seq_lens_ptr + seq)
        quantised = tl.load(quantised_ptr + seq)
        ring_slot = tl.load(slots_ptr + seq)
        start = seq_len - q_len  # the chunk's first position
        kv_head = head // GROUP
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        q_pos = start + offs_m
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None], other=0.0,
        )
        first_pos = start + tile * BLOCK_M
        hi = tl.minimum(first_pos + BLOCK_M, seq_len)  # keys after the tile's last query are not visible
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(first_pos - window + 1, 0)
        codes_base = codes_ptr + kv_head * stride_ch
        meta_base = meta_ptr + kv_head * stride_mh
        ring_base = ring_ptr + ring_slot * stride_rslot + kv_head * stride_rh
        own_k = k_ptr + kv_head * stride_kh
        own_v = v_ptr + kv_head * stride_kh
        bt_row = bt_ptr + seq * stride_bt
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # The context (blocks, then ring) precedes every query of the chunk: only the window masks it.
        m_i, l_i, acc = _attend_blocks(
            q, m_i, l_i, acc, lo, quantised, q_pos, offs_d, qk_scale, window,
            codes_base, meta_base, bt_row, block_size, stride_ckv, stride_cblk, stride_coff, stride_mkv, stride_mblk,
            USE_WINDOW=USE_WINDOW, BITS=BITS, HEAD_DIM=HEAD_DIM, PRECISION=PRECISION,
        )
        m_i, l_i, acc = _attend_run(
            q, m_i, l_i, acc, tl.maximum(lo, quantised), start, q_pos, offs_d, qk_scale, window,
            ring_base, stride_rkv, stride_roff, ring_window, own_k, own_v, q_start, start, stride_kt,
            SOURCE=1, CAUSAL=False, USE_WINDOW=USE_WINDOW, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            PRECISION=PRECISION,
        )
        m_i, l_i, acc = _attend_run(  # the chunk's own keys, causal
            q, m_i, l_i, acc, tl.maximum(lo, start), hi, q_pos, offs_d, qk_scale, window,
            ring_base, stride_rkv, stride_roff, ring_window, own_k, own_v, q_start, start, stride_kt,
            SOURCE=2, CAUSAL=True, USE_WINDOW=USE_WINDOW, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            PRECISION=PRECISION,
        )
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tok = (q_start + offs_m).to(tl.int64)
        tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural log
        tl.store(lse_ptr + tok * stride_lt + head * stride_lh, lse, mask=m_mask)


# ------------------------------------------------------------------------------------ wrappers
def check_kivi_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KiviCache, bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate q [T, H, D], the step's k, v [T, KVH, D] and a KIVI layer cache (codes uint8 [2, blocks,
    KVH, bs, D*bits/8], meta fp16 [2, blocks, KVH, bs, D/16] whose rows of a block and kv head are
    contiguous, ring [2, slots, KVH, W, D]). Returns q, k, v with unit stride along head_dim."""
    codes, meta, ring = kv_cache
    num_heads, head_dim = q.shape[1], q.shape[2]
    kvh = codes.shape[2]
    check_head_dim(head_dim)
    if bits not in (2, 4) or head_dim % KIVI_GROUP or codes.shape[3] % KIVI_GROUP:
        raise ValueError(f"KIVI needs 2 or 4 bits and head_dim, block_size multiples of {KIVI_GROUP}; got bits={bits}, "
                         f"head_dim={head_dim}, block_size={codes.shape[3]}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported q dtype {q.dtype}")
    if (codes.dtype != torch.uint8 or codes.shape[-1] != head_dim * bits // 8 or meta.dtype != torch.float16
            or meta.shape != (*codes.shape[:4], head_dim // 16) or ring.shape[2:] != (kvh, ring.shape[3], head_dim)
            or k.shape[1:] != (kvh, head_dim) or v.shape != k.shape):
        raise ValueError(f"a kivi{bits} KV cache is (uint8 codes [2, blocks, kv_heads, bs, D*bits/8], fp16 meta "
                         f"[.., D/16], ring [2, slots, kv_heads, W, D]) for k, v [T, kv_heads, D]; got codes "
                         f"{codes.dtype} {tuple(codes.shape)}, meta {meta.dtype} {tuple(meta.shape)}, ring "
                         f"{tuple(ring.shape)}, k {tuple(k.shape)}")
    if num_heads % kvh:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kvh}")
    if codes.stride(-1) != 1 or ring.stride(-1) != 1 or meta.stride(-1) != 1 or meta.stride(-2) != head_dim // 16:
        raise ValueError("a KIVI cache needs unit stride along its last dim and each block's meta rows contiguous")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


def _cache_args(kv_cache: KiviCache) -> tuple:
    codes, meta, ring = kv_cache
    return (codes, meta, ring, *codes.stride()[:4], meta.stride(0), meta.stride(1), meta.stride(2),
            *ring.stride()[:4])


def kivi_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KiviCache, bits: int, seq_lens: torch.Tensor,
    quantised: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, scale: float,
    sliding_window: int | None = None, num_splits: int | None = None, *, max_seq_len: int | None = None,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode over a KIVI cache: query b (q [B, H, D]) at position seq_lens[b] - 1 attends to its
    blocks' positions [0, quantised[b]), its ring (slot slots[b]) up to its own position, and its own
    k[b], v[b] ([B, KVH, D], not stored yet). Returns (out [B, H, D], lse [B, H] fp32, natural log)."""
    num_seqs, num_heads, head_dim = q.shape
    q, k, v = check_kivi_inputs(q, k, v, kv_cache, bits)
    codes, _, ring = kv_cache
    num_kv_heads = codes.shape[2]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(num_seqs, num_heads, dtype=torch.float32, device=q.device) if lse is None else lse
    if num_seqs == 0:
        return out, lse
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens[:num_seqs].max().item())
        num_splits = default_num_splits(max_seq_len, num_seqs, num_kv_heads, multiprocessor_count(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    group = num_heads // num_kv_heads
    config = decode_launch_config(head_dim, q.dtype, device_capability(q.device))
    common = dict(
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BITS=bits,
        USE_WINDOW=sliding_window is not None, BLOCK_N=block_n or config.block_n, PRECISION=config.precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    head = (q, k, v)
    tables = (seq_lens, quantised, slots, block_tables, *_cache_args(kv_cache))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    scalars = (block_tables.stride(0), scale * LOG2E, codes.shape[3], ring.shape[3], sliding_window or 0, num_splits)
    grid = (num_seqs, num_kv_heads, num_splits)
    if num_splits == 1:  # write the final result directly
        _kivi_decode_kernel[grid](
            *head, out, lse, *tables, *strides, out.stride(0), out.stride(1), 0, lse.stride(0), lse.stride(1), 0,
            *scalars, LSE_NATURAL=True, **common,
        )
        return out, lse
    part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _kivi_decode_kernel[grid](
        *head, part_out, part_lse, *tables, *strides,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        *scalars, LSE_NATURAL=False, **common,
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, lse,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
    )
    return out, lse


def kivi_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KiviCache, bits: int,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, quantised: torch.Tensor, slots: torch.Tensor,
    block_tables: torch.Tensor, scale: float, sliding_window: int | None = None, first_seq: int = 0, *,
    max_query_len: int | None = None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill chunks over a KIVI cache, sequences `first_seq..B-1` of the step: the chunk of sequence
    b (q, k, v rows query_start_loc[b]..[b+1], positions seq_lens[b] - its length onwards) attends to
    its blocks' positions [0, quantised[b]), its ring (slot slots[b]) up to the chunk, and its own
    k, v causally. q [T, H, D], k, v [T, KVH, D] (all of the step's tokens). Returns (out, lse) like
    `prefill_attention`; rows of other sequences are left as they were."""
    num_tokens, num_heads, head_dim = q.shape
    q, k, v = check_kivi_inputs(q, k, v, kv_cache, bits)
    codes, _, ring = kv_cache
    num_kv_heads = codes.shape[2]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device) if lse is None else lse
    num_seqs = seq_lens.shape[0] - first_seq
    if num_seqs <= 0 or num_tokens == 0:
        return out, lse
    if max_query_len is None:
        max_query_len = int(torch.diff(query_start_loc[first_seq:]).max().item())
    if max_query_len <= 0:
        return out, lse
    config = prefill_launch_config(head_dim, q.dtype, device_capability(q.device), kivi=True)
    # Dequantising a tile's keys and values in registers costs as much as int8's conversion and more:
    # 128 query rows spill on sm_80 at head_dim 128 and 64 rows at 256 (compile_check); half as many do not.
    rows = config.block_m if head_dim < 128 else min(config.block_m, 64 if head_dim == 128 else 32)
    block_m = block_m or rows
    block_n = block_n or config.block_n
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _kivi_prefill_kernel[grid](
        q, k, v, out, lse, query_start_loc, seq_lens, quantised, slots, block_tables, *_cache_args(kv_cache),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        lse.stride(1), block_tables.stride(0), scale * LOG2E, codes.shape[3], ring.shape[3], sliding_window or 0,
        first_seq,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BITS=bits, USE_WINDOW=sliding_window is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=config.precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def kivi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KiviCache, step: KiviStep,
                   seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_tables: torch.Tensor,
                   num_decodes: int, max_query_len: int, scale: float, sliding_window: int | None = None,
                   max_decode_len: int | None = None) -> torch.Tensor:
    """A step's attention over a KIVI cache as it was before the step (`kivi.kivi_attention`'s
    semantics): the decode kernel for the first `num_decodes` sequences (one token each), the
    prefill kernel for the rest. Returns [T, H, D]; the caller stores the step after (store_kivi)."""
    out = torch.empty_like(q)
    nd = num_decodes
    if nd:
        kivi_decode_attention(q[:nd], k[:nd], v[:nd], kv_cache, step.bits, seq_lens[:nd], step.quantised[:nd],
                              step.slots[:nd], block_tables[:nd], scale, sliding_window,
                              max_seq_len=max_decode_len, out=out[:nd])
    if seq_lens.shape[0] > nd:
        kivi_prefill_attention(q, k, v, kv_cache, step.bits, query_start_loc, seq_lens, step.quantised, step.slots,
                               block_tables, scale, sliding_window, first_seq=nd, max_query_len=max_query_len,
                               out=out)
    return out
