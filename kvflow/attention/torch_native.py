"""Torch-native paged attention: the CPU backend and the reference for other backends.

Decodes and prefill chunks are handled as two batched `scaled_dot_product_attention` calls over
KV gathered from the block tables, with a boolean mask for causality, padding and sliding
windows — no Python loop over sequences. Masks and gather indices are built once per step in
`prepare` and shared by all layers.

An int8 or fp8 cache (kv_quant.py) is read as codes, its scales (per token, or per kv head)
folded into the scores and the softmax weights. Attention always reads keys and values as the
cache holds them, the step's own included, so a prompt gives the same outputs whether its prefix
was computed now, in earlier chunks or found in the prefix cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.kivi import kivi_attention, store_kivi
from kvflow.attention.kv_quant import (
    dequantize_fp8,
    dequantize_int8,
    quantize_fp8,
    quantize_int8,
    store_fp8,
    store_int8,
)
from kvflow.attention.kv_spec import KVCacheSpec, LayerKV


class TorchNativeBackend:
    name = "torch_native"
    # Decode adds each block's attention mass to meta.extra["block_mass"] when asked (H2O).
    returns_block_mass = True
    # Head-major blocks: a gathered block is [kv_heads, block_size, head_dim], ready for batched
    # matmuls with no transposing copy (see `_decode`).

    @staticmethod
    def supports(spec: KVCacheSpec) -> bool:
        """Dense, int8, fp8 or KIVI keys and values in the head-major paged layout."""
        readable = spec.is_dense or spec.kv_dtype in ("int8", "fp8_e4m3") or spec.kivi_bits
        return bool(readable) and spec.layout == "head_major"

    # ------------------------------------------------------------------ prepare
    def prepare(self, meta: AttentionMetadata) -> None:
        nd, bs = meta.num_decodes, meta.block_size
        device = meta.slot_mapping.device
        meta.extra["slot_block"] = torch.div(meta.slot_mapping, bs, rounding_mode="floor")
        meta.extra["slot_offset"] = meta.slot_mapping % bs
        if nd:
            max_len = max(meta.seq_lens_list[:nd])
            nblocks = -(-max_len // bs)
            meta.extra["decode_blocks"] = meta.block_tables[:nd, :nblocks]
            key_pos = torch.arange(nblocks * bs, device=device)
            meta.extra["decode_key_pos"] = key_pos
            meta.extra["decode_seq_lens"] = meta.seq_lens[:nd]
        if meta.num_prefills:
            seq_lens = meta.seq_lens[nd:]
            query_lens = meta.query_lens[nd:]
            max_q = max(meta.query_lens_list[nd:])
            max_len = max(meta.seq_lens_list[nd:])
            nblocks = -(-max_len // bs)
            num_p = meta.num_prefills
            q_idx = torch.arange(max_q, device=device)
            valid_q = q_idx[None, :] < query_lens[:, None]  # [P, Qmax]
            # Flat index of each padded query slot; padding points at an extra zero row (index T_p).
            starts = meta.query_start_loc[nd:-1] - meta.query_start_loc[nd]
            num_tokens = int(meta.query_start_loc[-1] - meta.query_start_loc[nd])
            gather = torch.where(valid_q, starts[:, None] + q_idx[None, :], num_tokens)
            meta.extra["prefill_gather"] = gather
            meta.extra["prefill_scatter"] = torch.nonzero(valid_q.flatten(), as_tuple=True)[0]
            meta.extra["prefill_blocks"] = meta.block_tables[nd:, :nblocks]
            q_pos = (seq_lens - query_lens)[:, None] + q_idx[None, :]  # absolute position of queries
            meta.extra["prefill_q_pos"] = q_pos
            meta.extra["prefill_valid_q"] = valid_q
            meta.extra["prefill_key_pos"] = torch.arange(nblocks * bs, device=device)
            # A fresh single prompt attends only to itself: plain causal attention, no gather.
            meta.extra["prefill_fresh_single"] = num_p == 1 and meta.seq_lens_list[nd] == meta.query_lens_list[nd]

    def _mask(self, meta: AttentionMetadata, kind: str, window: int | None) -> torch.Tensor:
        key = f"{kind}_mask_{window}"
        mask = meta.extra.get(key)
        if mask is not None:
            return mask
        if kind == "decode":
            key_pos = meta.extra["decode_key_pos"][None, :]
            q_pos = (meta.extra["decode_seq_lens"] - 1)[:, None]
            visible = key_pos <= q_pos
            if window is not None:
                visible &= key_pos > q_pos - window
            # Additive fp32 bias [Bd, 1, 1, L]: 0 where a key is visible, -inf where it is not.
            mask = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
            mask = mask.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        else:
            key_pos = meta.extra["prefill_key_pos"][None, None, :]
            q_pos = meta.extra["prefill_q_pos"][:, :, None]
            mask = key_pos <= q_pos
            if window is not None:
                mask &= key_pos > q_pos - window
            # Padding queries attend to key 0 so softmax stays finite; their rows are dropped.
            mask |= (~meta.extra["prefill_valid_q"])[:, :, None] & (key_pos == 0)
            mask = mask[:, None, :, :]  # [P, 1, Qmax, L]
        meta.extra[key] = mask
        return mask

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        if meta.kivi is not None:  # attend over the cache as it was, then quantise and store (kivi.py)
            out = kivi_attention(q, k, v, kv_cache, meta.kivi, meta.block_tables, meta.query_lens_list,
                                 meta.query_start_loc.tolist()[:-1], scale, sliding_window)
            store_kivi(kv_cache, k, v, meta.kivi, meta.block_size)
            return out
        if isinstance(kv_cache, torch.Tensor):
            if kv_cache.dtype != k.dtype:  # a dense cache of another dtype: read back as stored
                k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
            kv_cache[0][meta.extra["slot_block"], :, meta.extra["slot_offset"]] = k
            kv_cache[1][meta.extra["slot_block"], :, meta.extra["slot_offset"]] = v
            k, v = k.to(q.dtype), v.to(q.dtype)
        elif _is_int8(kv_cache):  # attention reads what the cache holds, the step's own keys and values included
            store_int8(kv_cache, k, v, meta.extra["slot_block"], meta.extra["slot_offset"])
            k = dequantize_int8(*quantize_int8(k), dtype=k.dtype)
            v = dequantize_int8(*quantize_int8(v), dtype=v.dtype)
        else:  # fp8: the first step that stores KV calibrates the scales (unless given)
            store_fp8(kv_cache, k, v, meta.extra["slot_block"], meta.extra["slot_offset"])
            head_scales = kv_cache[1]
            k = dequantize_fp8(quantize_fp8(k, head_scales[0]), head_scales[0], k.dtype)
            v = dequantize_fp8(quantize_fp8(v, head_scales[1]), head_scales[1], v.dtype)
        nd = meta.num_decodes
        if not meta.num_prefills:
            return self._decode(q, kv_cache, meta, scale, sliding_window)
        if not nd:
            return self._prefill(q, k, v, kv_cache, meta, scale, sliding_window)
        return torch.cat(
            [
                self._decode(q[:nd], kv_cache, meta, scale, sliding_window),
                self._prefill(q[nd:], k[nd:], v[nd:], kv_cache, meta, scale, sliding_window),
            ]
        )

    def _gather(self, kv_cache: LayerKV, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nblocks] block ids -> keys, values as [B, kv_heads, nblocks * block_size, head_dim] (an
        int8 cache dequantised: this is the reference path for prefill chunks after a prefix)."""
        b, nblocks = blocks.shape
        if isinstance(kv_cache, torch.Tensor):
            halves = kv_cache[0][blocks].to(dtype), kv_cache[1][blocks].to(dtype)
        elif _is_int8(kv_cache):
            codes, scales = kv_cache
            halves = tuple(dequantize_int8(codes[i][blocks], scales[i][blocks], dtype) for i in (0, 1))
        else:  # fp8: a scale per kv head, broadcast over [.., kv_heads, block_size, D]
            codes, head_scales = kv_cache
            halves = tuple(dequantize_fp8(codes[i][blocks], head_scales[i][:, None], dtype) for i in (0, 1))
        _, _, kvh, bs, d = halves[0].shape
        keys, values = (h.transpose(1, 2).reshape(b, kvh, nblocks * bs, d) for h in halves)
        return keys, values

    def _decode(self, q: torch.Tensor, kv_cache: LayerKV, meta: AttentionMetadata, scale: float,
                window: int | None) -> torch.Tensor:
        """One query per sequence, attended block by block: the gathered blocks [B, nb, KVH, bs, D]
        feed batched matmuls as they are (no transposing copy of the context), the scores of all
        blocks share one softmax, and the per-block outputs are summed. On CPU this beats SDPA's
        flash kernel, which parallelises over queries, and a decode has only one. Quantised blocks
        enter the matmuls as their codes (exact in any float dtype); each key's scale multiplies
        its score, each value's scale its softmax weight."""
        blocks = meta.extra["decode_blocks"]
        b, nb = blocks.shape
        if isinstance(kv_cache, torch.Tensor):
            keys, values = kv_cache[0][blocks].to(q.dtype), kv_cache[1][blocks].to(q.dtype)  # [B, nb, KVH, bs, D]
            key_scales = value_scales = None
        else:  # codes are exact in any float dtype; scales per token [B, nb, KVH, bs, 1] or per kv head
            codes, scales = kv_cache
            keys, values = codes[0][blocks].to(q.dtype), codes[1][blocks].to(q.dtype)
            if _is_int8(kv_cache):
                key_scales, value_scales = scales[0][blocks], scales[1][blocks]
            else:  # [KVH, 1] -> [1, 1, KVH, 1, 1]
                key_scales, value_scales = (scales[i].view(1, 1, -1, 1, 1) for i in (0, 1))
        kvh, bs = keys.shape[2], keys.shape[3]
        num_heads, head_dim = q.shape[1], q.shape[2]
        group = num_heads // kvh  # query heads of a group share their KV
        scores = torch.matmul(q.view(b, 1, kvh, group, head_dim), keys.transpose(-1, -2))  # [B, nb, KVH, G, bs]
        if key_scales is not None:
            scores = scores.float() * key_scales.transpose(-1, -2)
        scores = scores.permute(0, 2, 3, 1, 4).reshape(b, kvh, group, nb * bs).float()
        scores = torch.add(self._mask(meta, "decode", window), scores, alpha=scale)  # [B, KVH, G, L]
        probs = torch.softmax(scores, dim=-1)
        mass = meta.extra.get("block_mass")
        if mass is not None:
            mass[:b, :nb] += probs.view(b, kvh * group, nb, bs).sum((1, 3))
        probs = probs.view(b, kvh, group, nb, bs).permute(0, 3, 1, 2, 4)  # [B, nb, KVH, G, bs]
        if value_scales is not None:
            probs = probs * value_scales.transpose(-1, -2)
        return torch.matmul(probs.to(values.dtype), values).sum(1).view(b, num_heads, head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: LayerKV,
                 meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
        if meta.extra["prefill_fresh_single"] and window is None:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True,
            )
            return out[0].transpose(0, 1)
        padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.extra["prefill_gather"]]
        keys, values = self._gather(kv_cache, meta.extra["prefill_blocks"], q.dtype)
        mask = self._mask(meta, "prefill", window)
        out = F.scaled_dot_product_attention(
            padded.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )  # [P, H, Qmax, D]
        out = out.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
        return out[meta.extra["prefill_scatter"]]


def _is_int8(kv_cache: LayerKV) -> bool:
    """A quantised layer cache: int8 (codes, per-token scales), else fp8 (codes, per-head scales)."""
    return not isinstance(kv_cache, torch.Tensor) and kv_cache[0].dtype == torch.int8
