"""KIVI (`--kv-cache-dtype kivi4|kivi2`): 4- or 2-bit asymmetric KV with a dense residual window.

KIVI (Liu et al., 2024) observes that keys have outlier *channels* and values do not, so it
quantises keys per channel over groups of G tokens and values per token over groups of G
channels, each group with a scale and a zero point (asymmetric), and keeps the most recent tokens
in the model's dtype until a whole group of them can be quantised. Here, with G = 32:

    a group's values x (keys: one channel of G tokens; values: G channels of one token)
    scale = fp16((max x - min x) / L)        L = 2**bits - 1 (15 or 3)
    zero  = fp16(min x)
    code  = clamp(round_half_even((x - zero) * (1 / scale)), 0, L)    (0 where scale == 0)
    x'    = code * scale + zero                                        (in fp32)

with scale and zero read back from fp16 before the codes are computed (every implementation
computes `1 / scale` once, in fp32, and multiplies, so codes agree bit for bit).

**What a block holds** (kv_spec.py): per token and kv head, for keys and for values,
- "codes" uint8 [D * bits / 8]: the codes of the row's D channels, packed low bits first
  (kivi4: channel 2i in the low nibble of byte i; kivi2: channel 4i + j in bits 2j..2j+1);
- "meta" float16 [D / 16]: a block's meta rows for one kv head are one contiguous run of
  block_size * D / 16 halves, read as
    keys:   [block_size / G groups][2 (scale, zero)][D]      (group g covers offsets g*G..g*G+G-1)
    values: [block_size][2 (scale, zero)][D / G]              (one row per token).
  Both are 2 halves per 32 elements, so keys and values share one component and the block size
  must be a multiple of G.

**The residual window** lives beside the blocks: per layer, a ring [2, slots, kv_heads, W, D] of the
model's dtype, W = R + G, one slot per running sequence (the scheduler gives each one, as it gives
blocks). Position p of a sequence sits at ring index p % W. A sequence of n tokens holds positions
[0, Q) quantised in its blocks and [Q, n) dense in its ring, where

    Q = max(H, G * floor(max(0, n - R) / G))

and H is the part of its prompt it found in the prefix cache (already quantised, a multiple of the
block size; 0 otherwise). So once n >= R, between R and R + G - 1 newest tokens are dense, and a
group is quantised when the G-th token past R + G - 1 arrives, a group at a time. Codes of
positions >= Q are not written yet; only blocks wholly below Q may be shared (prefix caching keeps
R tokens, rounded up to blocks, out of a hit: `shareable_prefix`).

**A step** (`KiviStep`): a sequence's chunk [start, n) attends to its context as the cache held it
before the step — positions [0, Q_before) dequantised from the blocks, [Q_before, start) from the
ring — and to its own tokens as computed (dense), as KIVI's prefill does. Then the groups
[Q_before, Q_after) are quantised into the blocks (their rows come from the ring or from the step)
and the chunk's tokens in [Q_after, n) are written to the ring. Attention runs before the ring
writes, because a long chunk's ring writes may wrap onto positions its own queries still read.

Everything here is in cache indices: a KV policy that drops blocks (StreamingLLM, once they are
quantised) or compacts them (SnapKV) moves the ring's rows with the entries (`rotate_rings`,
`compact_sequence`).

This module is the reference every kernel (C++, Triton) must reproduce, and the torch backend's
store and attention for KIVI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvflow.config import KIVI_GROUP  # G: tokens per key group, channels per value group

KIVI_FORMATS = {"kivi4": 4, "kivi2": 2}
KIVI_DEFAULT_RESIDUAL = 128  # R: newest tokens kept in the model's dtype (a multiple of G)


def meta_width(head_dim: int) -> int:
    """fp16 meta entries per token and kv head: a scale and a zero per G elements."""
    return 2 * head_dim // KIVI_GROUP


def quantised_length(num_tokens: int, residual: int, floor: int = 0) -> int:
    """Q: how many of a sequence's first `num_tokens` positions its blocks hold quantised."""
    return max(floor, KIVI_GROUP * (max(0, num_tokens - residual) // KIVI_GROUP))


def shareable_prefix(num_tokens: int, residual: int, block_size: int) -> int:
    """Of a computed prefix of `num_tokens` (a multiple of the block size), the tokens whose blocks are
    wholly quantised whenever that prefix has been computed: what another request may reuse."""
    return max(0, num_tokens - block_size * -(-residual // block_size))


# ------------------------------------------------------------------------ codes
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (each < 2**bits) -> packed uint8 [..., D * bits / 8], low bits first."""
    per_byte = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per_byte):
        out |= c[..., j] << (bits * j)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 [..., W] -> uint8 codes [..., W * 8 / bits]."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def quantize_asym(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise x over `dim` (each slice along it is one group): (uint8 codes like x, fp16 scale and
    zero with `dim` kept as size 1)."""
    levels = (1 << bits) - 1
    x32 = x.float()
    lo, hi = x32.amin(dim=dim, keepdim=True), x32.amax(dim=dim, keepdim=True)
    scale16 = ((hi - lo) / torch.full_like(lo, levels)).to(torch.float16)
    zero16 = lo.to(torch.float16)
    s, z = scale16.float(), zero16.float()
    inv = torch.where(s > 0, torch.ones_like(s) / s, torch.zeros_like(s))
    codes = torch.round((x32 - z) * inv).clamp_(0, levels).to(torch.uint8)
    return codes, scale16, zero16


def quantize_key_group(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key groups [G, ..., kv_heads, D] (tokens first) -> (packed codes [G, ..., kv_heads, D*bits/8],
    meta [..., kv_heads, 2 (scale, zero), D] fp16)."""
    codes, scale, zero = quantize_asym(keys, bits, dim=0)
    return pack_codes(codes, bits), torch.stack([scale[0], zero[0]], dim=-2)  # [..., KVH, 2, D]


def quantize_values(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Value rows [T, kv_heads, D] -> (packed codes [T, kv_heads, D*bits/8], meta [T, kv_heads, D/16] fp16,
    laid out [2 (scale, zero), D/G] per row)."""
    t, h, d = values.shape
    codes, scale, zero = quantize_asym(values.reshape(t, h, d // KIVI_GROUP, KIVI_GROUP), bits, dim=-1)
    meta = torch.stack([scale[..., 0], zero[..., 0]], dim=-2)  # [T, KVH, 2, D/G]
    return pack_codes(codes.reshape(t, h, d), bits), meta.reshape(t, h, 2 * d // KIVI_GROUP)


def dequantize_blocks(codes: torch.Tensor, meta: torch.Tensor, bits: int, half: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blocks of one half (0 keys, 1 values): codes [..., KVH, bs, D*bits/8], meta [..., KVH, bs, D/16]
    -> [..., KVH, bs, D] in fp32, cast to `dtype`. The reference for every kernel's reads."""
    c = unpack_codes(codes, bits).float()  # [..., KVH, bs, D]
    bs, d = c.shape[-2], c.shape[-1]
    lead = c.shape[:-2]
    m = meta.float().reshape(*lead, bs * d // 16)
    if half == 0:  # [bs/G][2][D]: one scale and zero per channel for each group of G tokens
        m = m.reshape(*lead, bs // KIVI_GROUP, 2, d)
        scale = m[..., 0, :].repeat_interleave(KIVI_GROUP, dim=-2)
        zero = m[..., 1, :].repeat_interleave(KIVI_GROUP, dim=-2)
    else:  # [bs][2][D/G]: one scale and zero per token for each group of G channels
        m = m.reshape(*lead, bs, 2, d // KIVI_GROUP)
        scale = m[..., 0, :].repeat_interleave(KIVI_GROUP, dim=-1)
        zero = m[..., 1, :].repeat_interleave(KIVI_GROUP, dim=-1)
    return (c * scale + zero).to(dtype)


# ------------------------------------------------------------------------- step
@dataclass
class KiviStep:
    """One step's KIVI bookkeeping, built once by the runner and shared by every layer.

    Per sequence (chunk order): `slots` its residual ring slot, `starts` the chunk's first position,
    `quantised` Q before the step (what attention reads from the blocks); `quantised_after_list` Q after.
    Per group to quantise this step (`group_*`, one entry per token of the group, G per group):
    where each row comes from (the step's tokens, or the ring) and where its codes go. Per ring write
    (`ring_*`): which step token goes to which (slot, index)."""

    bits: int
    residual: int  # R
    window: int  # W = R + G, the ring's length
    slots: torch.Tensor  # [B] int64
    starts: torch.Tensor  # [B] int64
    quantised: torch.Tensor  # [B] int64
    group_from_step: torch.Tensor  # [N] bool: the row is one of this step's tokens
    group_step_index: torch.Tensor  # [N] int64: flat step token (where from_step)
    group_ring_slot: torch.Tensor  # [N] int64: ring slot (where not from_step)
    group_ring_index: torch.Tensor  # [N] int64
    group_block: torch.Tensor  # [N / G] int64: the block the group lies in
    group_index: torch.Tensor  # [N / G] int64: which of the block's key groups it is
    group_offset: torch.Tensor  # [N] int64: each row's offset in its block
    ring_step_index: torch.Tensor  # [M] int64
    ring_slot: torch.Tensor  # [M] int64
    ring_index: torch.Tensor  # [M] int64
    # Python copies, for planning without device syncs.
    quantised_list: list[int]
    quantised_after_list: list[int]

    @classmethod
    def build(cls, bits: int, residual: int, block_size: int, slots: list[int], starts: list[int],
              seq_lens: list[int], floors: list[int], query_start: list[int], block_tables: list[list[int]],
              device: torch.device) -> KiviStep:
        """From each chunk's residual slot, first position, length after the step, prefix floor (H),
        flat offset of its tokens and block table."""
        window = residual + KIVI_GROUP
        before = [quantised_length(s, residual, f) for s, f in zip(starts, floors)]
        after = [quantised_length(n, residual, f) for n, f in zip(seq_lens, floors)]
        g_step, g_idx, g_slot, g_ring, g_off, g_block, g_group = [], [], [], [], [], [], []
        r_idx, r_slot, r_ring = [], [], []
        for b, (slot, start, n) in enumerate(zip(slots, starts, seq_lens)):
            for p0 in range(before[b], after[b], KIVI_GROUP):
                g_block.append(block_tables[b][p0 // block_size])
                g_group.append((p0 % block_size) // KIVI_GROUP)
                for p in range(p0, p0 + KIVI_GROUP):
                    g_step.append(p >= start)
                    g_idx.append(query_start[b] + p - start if p >= start else 0)
                    g_slot.append(slot)
                    g_ring.append(p % window)
                    g_off.append(p % block_size)
            for p in range(max(start, after[b]), n):
                r_idx.append(query_start[b] + p - start)
                r_slot.append(slot)
                r_ring.append(p % window)

        def t(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(bits, residual, window, t(slots), t(starts), t(before), t(g_step, torch.bool),
                   t(g_idx), t(g_slot), t(g_ring), t(g_block), t(g_group), t(g_off), t(r_idx), t(r_slot),
                   t(r_ring), before, after)


def rotate_rings(caches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], slot: int, shift: int) -> None:
    """A KV policy evicted `shift` positions below Q: the sequence's later cache entries moved down as
    many indices, so its ring rows (entry c at c % W) move with them, in every layer."""
    for _, _, ring in caches:
        ring[:, slot] = torch.roll(ring[:, slot], -shift, dims=2)


def read_sequence(cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], table: torch.Tensor, kv_len: int,
                  quantised: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `kv_len` cache entries as it holds them, keys and values [kv_heads, kv_len, D]
    in fp32: [0, quantised) dequantised from its blocks, the rest from its ring (a KV policy's reads)."""
    codes, meta, ring = cache
    bs, head_dim, window = codes.shape[3], ring.shape[-1], ring.shape[3]
    bits = codes.shape[-1] * 8 // head_dim
    nb = -(-kv_len // bs)
    dense = torch.arange(quantised, kv_len, device=table.device)
    out = []
    for half in (0, 1):
        x = dequantize_blocks(codes[half][table[:nb]], meta[half][table[:nb]], bits, half)  # [nb, KVH, bs, D]
        x = x.transpose(0, 1).reshape(x.shape[1], nb * bs, head_dim)[:, :kv_len]
        x[:, dense] = ring[half][slot][:, dense % window].float()
        out.append(x)
    return out[0], out[1]


def compact_sequence(cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], keys: torch.Tensor,
                     values: torch.Tensor, keep: torch.Tensor, dest: torch.Tensor, slot: int, residual: int) -> None:
    """Write the tokens `keep` [kv_heads, n] (indices into keys, values [kv_heads, L, D], e.g. SnapKV's
    choice per head) as a fresh sequence of n tokens: its groups quantised into the `dest` blocks, its
    newest ones into the ring slot, by KIVI's rule (the kept tokens are quantised again, in new groups)."""
    codes = cache[0]
    bits = codes.shape[-1] * 8 // keys.shape[-1]
    index = keep[..., None].expand(-1, -1, keys.shape[-1])
    rows_k = keys.gather(1, index).transpose(0, 1)  # [n, KVH, D]
    rows_v = values.gather(1, index).transpose(0, 1)
    n = keep.shape[1]
    step = KiviStep.build(bits, residual, codes.shape[3], [slot], [0], [n], [0], [0], [dest.tolist()], keys.device)
    store_kivi(cache, rows_k, rows_v, step, codes.shape[3])


def store_kivi(cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
               step: KiviStep, block_size: int) -> None:
    """After attention: quantise the step's completed groups into their blocks and write the step's
    residual tokens to the ring. k, v [T, kv_heads, D] as computed."""
    codes, meta, ring = cache
    if step.group_from_step.numel():
        num_groups = step.group_block.numel()
        kvh, d = k.shape[1], k.shape[2]
        from_ring = torch.nonzero(~step.group_from_step, as_tuple=True)[0]
        for half, x in enumerate((k, v)):
            rows = x[step.group_step_index]  # rows of earlier steps come from the ring, below
            if from_ring.numel():
                rows[from_ring] = ring[half][step.group_ring_slot[from_ring], :,
                                             step.group_ring_index[from_ring]].to(x.dtype)
            block = step.group_block.repeat_interleave(KIVI_GROUP)
            if half == 0:
                packed, group_meta = quantize_key_group(rows.view(num_groups, KIVI_GROUP, kvh, d).transpose(0, 1),
                                                        step.bits)
                # packed [G, groups, KVH, W] -> rows in order; meta [groups, KVH, 2, D] into the block's region
                packed = packed.transpose(0, 1).reshape(-1, kvh, packed.shape[-1])
                region = meta[0].view(meta.shape[1], kvh, block_size // KIVI_GROUP, 2, d)
                region[step.group_block, :, step.group_index] = group_meta
            else:
                packed, row_meta = quantize_values(rows, step.bits)
                meta[1][block, :, step.group_offset] = row_meta
            codes[half][block, :, step.group_offset] = packed
    if step.ring_step_index.numel():
        for half, x in enumerate((k, v)):
            ring[half][step.ring_slot, :, step.ring_index] = x[step.ring_step_index].to(ring.dtype)


def kivi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], step: KiviStep,
                   block_tables: torch.Tensor, query_lens: list[int], query_start: list[int], scale: float,
                   window: int | None = None) -> torch.Tensor:
    """Attention of a step's queries q [T, H, D] over each sequence's context as the cache holds it
    (dequantised blocks below Q, the ring up to the chunk) and its own k, v [T, KVH, D]: the torch
    reference, one batched SDPA for decodes and prefill chunks alike. Returns [T, H, D]."""
    codes, meta, ring = cache
    num_seqs = len(query_lens)
    bs = codes.shape[3]
    device = q.device
    # Quantised part: the blocks holding positions [0, Q) of each sequence.
    nbq = max(1, -(-max(step.quantised_list) // bs))
    tables = block_tables[:, :nbq]
    kvh, d = k.shape[1], k.shape[2]
    parts_k, parts_v, pos, valid = [], [], [], []
    for half, out in ((0, parts_k), (1, parts_v)):
        blocks = dequantize_blocks(codes[half][tables], meta[half][tables], step.bits, half, q.dtype)
        out.append(blocks.transpose(1, 2).reshape(num_seqs, kvh, nbq * bs, d))  # [B, KVH, nbq*bs, D]
        out.append(ring[half][step.slots].to(q.dtype))  # [B, KVH, W, D]
    qpos_blocks = torch.arange(nbq * bs, device=device)[None, :].expand(num_seqs, -1)
    pos.append(qpos_blocks)
    valid.append(qpos_blocks < step.quantised[:, None])
    w = torch.arange(step.window, device=device)[None, :]
    q_lo = step.quantised[:, None]
    ring_pos = q_lo + torch.remainder(w - q_lo, step.window)  # the position each ring entry holds now
    pos.append(ring_pos)
    valid.append(ring_pos < step.starts[:, None])
    # The step's own tokens, padded per sequence; padding gathers an extra zero row.
    max_q = max(query_lens)
    idx = torch.arange(max_q, device=device)
    lens = torch.tensor(query_lens, dtype=torch.long, device=device)
    own_valid = idx[None, :] < lens[:, None]
    starts_flat = torch.tensor(query_start, dtype=torch.long, device=device)
    gather = torch.where(own_valid, starts_flat[:, None] + idx[None, :], q.shape[0])
    for x, out in ((k, parts_k), (v, parts_v)):
        padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[gather]  # [B, maxq, KVH, D]
        out.append(padded.transpose(1, 2).to(q.dtype))
    own_pos = step.starts[:, None] + idx[None, :]
    pos.append(own_pos)
    valid.append(own_valid)
    keys, values = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
    key_pos, key_valid = torch.cat(pos, dim=1), torch.cat(valid, dim=1)  # [B, L]
    q_pos = own_pos  # [B, maxq]
    mask = key_valid[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        mask &= key_pos[:, None, :] > q_pos[:, :, None] - window
    mask |= (~own_valid)[:, :, None] & (torch.arange(key_pos.shape[1], device=device) == 0)[None, None, :]
    padded_q = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[gather]  # [B, maxq, H, D]
    out = F.scaled_dot_product_attention(padded_q.transpose(1, 2), keys, values, attn_mask=mask[:, None],
                                         scale=scale, enable_gqa=True)  # [B, H, maxq, D]
    out = out.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
    return out[torch.nonzero(own_valid.flatten(), as_tuple=True)[0]]
