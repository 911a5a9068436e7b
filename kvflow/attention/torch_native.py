"""Torch-native paged attention: the CPU backend and the reference for other backends.

Decodes and prefill chunks are handled as two batched `scaled_dot_product_attention` calls over
KV gathered from the block tables, with a boolean mask for causality, padding and sliding
windows — no Python loop over sequences. Masks and gather indices are built once per step in
`prepare` and shared by all layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.kv_spec import KVCacheSpec


class TorchNativeBackend:
    name = "torch_native"
    # Head-major blocks: a gathered block is [kv_heads, block_size, head_dim], ready for batched
    # matmuls with no transposing copy (see `_decode`).

    @staticmethod
    def supports(spec: KVCacheSpec) -> bool:
        """Dense keys and values in the head-major paged layout."""
        return spec.is_dense and spec.layout == "head_major"

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
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        kv_cache[0][meta.extra["slot_block"], :, meta.extra["slot_offset"]] = k
        kv_cache[1][meta.extra["slot_block"], :, meta.extra["slot_offset"]] = v
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

    def _gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nblocks] block ids -> keys, values as [B, kv_heads, nblocks * block_size, head_dim]."""
        b, nblocks = blocks.shape
        _, _, kvh, bs, d = kv_cache.shape
        keys = kv_cache[0][blocks].transpose(1, 2).reshape(b, kvh, nblocks * bs, d)
        values = kv_cache[1][blocks].transpose(1, 2).reshape(b, kvh, nblocks * bs, d)
        return keys, values

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int | None) -> torch.Tensor:
        """One query per sequence, attended block by block: the gathered blocks [B, nb, KVH, bs, D]
        feed batched matmuls as they are (no transposing copy of the context), the scores of all
        blocks share one softmax, and the per-block outputs are summed. On CPU this beats SDPA's
        flash kernel, which parallelises over queries, and a decode has only one."""
        blocks = meta.extra["decode_blocks"]
        b, nb = blocks.shape
        keys, values = kv_cache[0][blocks], kv_cache[1][blocks]  # [B, nb, KVH, bs, D]
        kvh, bs = keys.shape[2], keys.shape[3]
        num_heads, head_dim = q.shape[1], q.shape[2]
        group = num_heads // kvh  # query heads of a group share their KV
        scores = torch.matmul(q.view(b, 1, kvh, group, head_dim), keys.transpose(-1, -2))  # [B, nb, KVH, G, bs]
        scores = scores.permute(0, 2, 3, 1, 4).reshape(b, kvh, group, nb * bs).float()
        scores = torch.add(self._mask(meta, "decode", window), scores, alpha=scale)  # [B, KVH, G, L]
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        probs = probs.view(b, kvh, group, nb, bs).permute(0, 3, 1, 2, 4)  # [B, nb, KVH, G, bs]
        return torch.matmul(probs, values).sum(1).view(b, num_heads, head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
        if meta.extra["prefill_fresh_single"] and window is None:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True,
            )
            return out[0].transpose(0, 1)
        padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.extra["prefill_gather"]]
        keys, values = self._gather(kv_cache, meta.extra["prefill_blocks"])
        mask = self._mask(meta, "prefill", window)
        out = F.scaled_dot_product_attention(
            padded.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )  # [P, H, Qmax, D]
        out = out.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
        return out[meta.extra["prefill_scatter"]]
