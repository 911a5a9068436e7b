"""The Triton attention backend: store_kv, then flash-decoding for the decodes and varlen
FlashAttention-2 prefill for the prefill chunks, all over the torch-native paged cache layout,
dense or int8 (codes and scales; kv_quant.py). Like the torch-native backend, attention reads keys
and values as the cache holds them, the step's own included: they are stored first."""

from __future__ import annotations

import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.attention.triton.decode import decode_attention
from kvflow.attention.triton.kv_store import store_kv
from kvflow.attention.triton.prefill import prefill_attention


class TritonBackend:
    name = "triton"

    @staticmethod
    def supports(spec: KVCacheSpec) -> bool:
        """Dense or int8 keys and values in the head-major paged layout."""
        return (spec.is_dense or spec.kv_dtype == "int8") and spec.layout == "head_major"

    def prepare(self, meta: AttentionMetadata) -> None:
        """The longest decode context, from the Python list (no device sync per layer); the split
        count follows from it per layer (it also needs the cache's kv heads). None (list not filled
        in) makes the wrapper read it from the tensor."""
        nd = meta.num_decodes
        meta.extra["triton_decode_max_len"] = max(meta.seq_lens_list[:nd]) if nd and meta.seq_lens_list else None

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
        if "triton_decode_max_len" not in meta.extra:
            self.prepare(meta)
        store_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            decode_attention(
                q[:nd], kv_cache, meta.seq_lens[:nd], meta.block_tables[:nd], scale, sliding_window,
                max_seq_len=meta.extra["triton_decode_max_len"], out=out[:nd],
            )
        if meta.num_prefills:
            prefill_attention(
                q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, sliding_window,
                first_seq=nd, max_query_len=meta.max_query_len, out=out,  # a prefill chunk is the longest
            )
        return out
