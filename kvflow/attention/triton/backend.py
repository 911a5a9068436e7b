"""The Triton attention backend: store_kv, then flash-decoding for the decodes and varlen
FlashAttention-2 prefill for the prefill chunks (decodes that share prefix-cached blocks read them
once per group: decode.py), all over the torch-native paged cache layout,
dense, int8 or fp8_e4m3 (codes and scales; kv_quant.py). Like the torch-native backend, attention
reads keys and values as the cache holds them, the step's own included: they are stored first. An
fp8 cache whose scales are not set yet gets them calibrated (kv_quant.calibrate_fp8, in PyTorch)
from the first step that stores KV, before the store.

A KIVI cache (kivi4 / kivi2; kvflow/attention/kivi.py) is the exception, as in the torch backend:
attention runs first, over the cache as it was before the step and the step's own k, v
(triton/kivi.py, reading the packed blocks and the residual ring in place), then `kivi.store_kivi`
(PyTorch) quantises the step's completed groups and writes its newest tokens to the ring."""

from __future__ import annotations

import weakref

import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.kivi import store_kivi
from kvflow.attention.kv_quant import calibrate_fp8
from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.attention.triton.decode import decode_attention, own_key_starts
from kvflow.attention.triton.kivi import kivi_attention
from kvflow.attention.triton.kv_store import store_kv
from kvflow.attention.triton.prefill import prefill_attention


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        # fp8 head-scale tensors seen calibrated (by id, with a weak reference that tells a reused
        # id): checking the scales costs a device sync, so each layer's is checked until they are
        # set, then never again (scales are never reset to 0 once set).
        self._calibrated: dict[int, weakref.ref] = {}

    @staticmethod
    def supports(spec: KVCacheSpec) -> bool:
        """Dense, int8, fp8_e4m3 or KIVI keys and values in the head-major paged layout."""
        readable = spec.is_dense or spec.kv_dtype in ("int8", "fp8_e4m3") or spec.kivi_bits
        return bool(readable) and spec.layout == "head_major"

    def prepare(self, meta: AttentionMetadata) -> None:
        """The longest decode context, from the Python list (no device sync per layer); the split
        count follows from it per layer (it also needs the cache's kv heads). None (list not filled
        in) makes the wrapper read it from the tensor."""
        nd = meta.num_decodes
        meta.extra["triton_decode_max_len"] = max(meta.seq_lens_list[:nd]) if nd and meta.seq_lens_list else None
        if meta.shared_prefix is not None:  # where each group member's own keys start, for every layer
            meta.extra["triton_key_starts"] = own_key_starts(meta.shared_prefix, nd, meta.block_size)

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
        if meta.kivi is not None:  # attend over the cache as it was, then quantise and store (kivi.py)
            out = kivi_attention(q, k, v, kv_cache, meta.kivi, meta.seq_lens, meta.query_start_loc, meta.block_tables,
                                 meta.num_decodes, meta.max_query_len, scale, sliding_window,
                                 max_decode_len=meta.extra["triton_decode_max_len"])
            store_kivi(kv_cache, k, v, meta.kivi, meta.block_size)
            return out
        if not isinstance(kv_cache, torch.Tensor) and kv_cache[0].dtype == torch.float8_e4m3fn:
            self._calibrate(kv_cache[1], k, v)
        store_kv(k, v, kv_cache, meta.slot_mapping, calibrate=False)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            decode_attention(
                q[:nd], kv_cache, meta.seq_lens[:nd], meta.block_tables[:nd], scale, sliding_window,
                max_seq_len=meta.extra["triton_decode_max_len"], out=out[:nd], shared=meta.shared_prefix,
                key_starts=meta.extra.get("triton_key_starts"),
            )
        if meta.num_prefills:
            prefill_attention(
                q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, sliding_window,
                first_seq=nd, max_query_len=meta.max_query_len, out=out,  # a prefill chunk is the longest
            )
        return out

    def _calibrate(self, head_scales: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Calibrate an fp8 layer's scales not yet set from this step's k, v (`calibrate_fp8`, which
        reads them back: once per layer, until they are set)."""
        ref = self._calibrated.get(id(head_scales))
        if (ref is not None and ref() is head_scales) or k.shape[0] == 0:
            return
        calibrate_fp8(head_scales, k, v)
        self._calibrated = {i: r for i, r in self._calibrated.items() if r() is not None}
        self._calibrated[id(head_scales)] = weakref.ref(head_scales)
