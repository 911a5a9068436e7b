"""``kvflow bench attention``: attention kernels alone, against torch SDPA and a naive reference.

Why: the engine's step time hides which attention is fast where. This times one attention call
over a paged KV cache (blocks scattered, as a long-running server leaves them) for prefill (B
sequences of n new tokens, causal) and decode (B sequences, one query after n keys), and reports
achieved TFLOP/s (prefill: 4·H·D per causal query-key pair) or GB/s (decode: K and V read once).

Implementations, where the device has them:
- ``kvflow-cpu``: the C++ CPU forward's paged attention (CPU, when the extension builds);
- ``kvflow-cpu-int8`` / ``kvflow-cpu-fp8``: the same kernel over the case's cache quantised as
  ``--kv-cache-dtype int8`` (codes + a scale per token and kv head) or ``fp8_e4m3`` (codes + a
  scale per kv head, calibrated on the cache), dequantised in registers;
- ``kvflow-cpu-kivi4`` / ``kvflow-cpu-kivi2`` (decode; block size and head_dim multiples of 32): the
  C++ KIVI kernel (cpu_kivi.h) over the same ``kivi_state`` as ``triton-kivi*`` below: the blocks'
  4- or 2-bit codes read in place, the ring and the query's own k, v dense;
- ``triton`` / ``triton-nosplit``: kvflow's Triton kernels, flash-decoding with automatic and
  with a single split (CUDA); ``triton-int8`` / ``triton-fp8``: the same over the quantised cache;
- ``triton-kivi4`` / ``triton-kivi2`` (decode; block size and head_dim multiples of 32): the
  Triton KIVI decode kernel over the case's context as ``--kv-cache-dtype kivi4|kivi2`` holds it
  before the query's step (``kivi_state``: positions below Q quantised in the blocks, the newest
  in the residual ring, R = 128) and the query's own k, v;
- ``kvflow-cpu-quest`` / ``triton-quest`` (decode): ``--kv-policy quest`` at ``quest_budget`` tokens:
  the blocks' key bounds scored against the query (kv_policy_ops.quest_select: Quest's bound,
  one table per sequence; on CPU chosen by the C++ ``quest_select`` kernel), then
  the same kernel over only the chosen blocks; both steps are timed,
  and the error is against ``naive`` over the chosen blocks (Quest is lossy by design: what it
  skips is its accuracy cost, measured by ``kvflow eval``, not here);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on contiguous per-sequence K/V
  (the gather into that layout is not timed: this is the baseline at its best); on CUDA in 16-bit
  it is forced onto the FlashAttention backend, K/V repeated per query head;
- ``naive``: softmax(QKᵀ)V with the score matrix materialised (skipped above ``naive_max_len``).
Every result carries its largest deviation from ``naive`` (else from ``sdpa``), so a fast wrong
kernel shows (an int8 implementation is checked against ``naive`` over its dequantised cache, so
its error is the kernel's, not the quantisation's; GB/s count the bytes each format reads).
``check_targets`` turns a GPU run into pass/fail against the Triton kernels' goals.

``SharedPrefixCase`` (``--shared-prefix``): decodes in groups that share prefix-cached blocks, timed
with the kernel's shared-prefix groups and without (kvflow/attention/shared_prefix.py).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvflow.attention.kivi import KiviStep

IMPLEMENTATIONS = ("kvflow-cpu", "kvflow-cpu-int8", "kvflow-cpu-fp8", "kvflow-cpu-kivi4", "kvflow-cpu-kivi2",
                   "kvflow-cpu-quest", "triton", "triton-nosplit",
                   "triton-int8", "triton-fp8", "triton-quest", "triton-kivi4", "triton-kivi2", "sdpa", "naive")
# implementation name suffix -> the cache format it reads
QUANTISED = {"-int8": "int8", "-fp8": "fp8_e4m3", "-kivi4": "kivi4", "-kivi2": "kivi2"}
KIVI_BENCH_RESIDUAL = 128  # R of the KIVI implementations' cache (kivi.KIVI_DEFAULT_RESIDUAL)


def quantised_format(name: str) -> str | None:
    return next((fmt for suffix, fmt in QUANTISED.items() if name.endswith(suffix)), None)


def is_kivi(kv_format: str | None) -> bool:
    return kv_format in ("kivi4", "kivi2")


@dataclass
class KiviState:
    """A decode case's context as a KIVI cache holds it before the query's step, and that step."""

    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (codes, meta, ring): kv_spec's KIVI layout
    step: KiviStep  # the decode step (each sequence's Q, ring slot, ...)
    k: torch.Tensor  # [B, KVH, D]: each query's own key and value (position n - 1), not stored yet
    v: torch.Tensor


@dataclass
class AttentionCase:
    """Random inputs of one measured shape: a paged cache and the same K/V contiguous."""

    kind: str  # "prefill" | "decode"
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    quest_budget: int = 1024  # tokens a ``-quest`` implementation reads per sequence
    q: torch.Tensor = field(init=False)  # [T, H, D]
    kv_cache: torch.Tensor = field(init=False)  # [2, blocks, KVH, block_size, D]
    block_tables: torch.Tensor = field(init=False)  # [B, blocks per sequence]
    seq_lens: torch.Tensor = field(init=False)  # [B]
    query_start_loc: torch.Tensor = field(init=False)  # [B + 1]
    positions: torch.Tensor = field(init=False)  # [T]
    seq_index: torch.Tensor = field(init=False)  # [T]
    keys: torch.Tensor = field(init=False)  # [B, KVH, n, D], contiguous
    values: torch.Tensor = field(init=False)
    _quantised: dict = field(init=False, default_factory=dict)  # format -> (codes, scales), made on first use

    def __post_init__(self) -> None:
        if self.kind not in ("prefill", "decode"):
            raise ValueError(f"kind must be 'prefill' or 'decode', got {self.kind!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        gen = torch.Generator().manual_seed(0)
        b, n, bs, kvh, d = self.batch, self.seq_len, self.block_size, self.num_kv_heads, self.head_dim
        per_seq = math.ceil(n / bs)
        blocks = torch.randperm(b * per_seq, generator=gen)
        self.block_tables = blocks.view(b, per_seq).to(self.device)
        cache = torch.randn(2, b * per_seq, kvh, bs, d, generator=gen).to(self.dtype)
        self.kv_cache = cache.to(self.device)
        # [B, per_seq, KVH, bs, D] -> [B, KVH, n, D]
        gathered = cache[:, blocks.view(b, per_seq)].permute(0, 1, 3, 2, 4, 5).reshape(2, b, kvh, per_seq * bs, d)
        self.keys = gathered[0, :, :, :n].contiguous().to(self.device)
        self.values = gathered[1, :, :, :n].contiguous().to(self.device)
        q_len = n if self.kind == "prefill" else 1
        self.q = torch.randn(b * q_len, self.num_heads, d, generator=gen).to(self.dtype).to(self.device)
        self.seq_lens = torch.full((b,), n, dtype=torch.long, device=self.device)
        self.query_start_loc = torch.arange(0, b * q_len + 1, q_len, dtype=torch.long, device=self.device)
        first = 0 if self.kind == "prefill" else n - 1
        self.positions = torch.arange(first, n, dtype=torch.long).repeat(b).to(self.device)
        self.seq_index = torch.arange(b, dtype=torch.long).repeat_interleave(q_len).to(self.device)

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def q_len(self) -> int:
        return self.seq_len if self.kind == "prefill" else 1

    def work(self, kv_format: str | None = None) -> float:
        """Prefill: FLOPs of the causal pairs; decode: bytes of K and V read once (a quantised
        format: its codes, and int8's per-token scales)."""
        if self.kind == "prefill":
            pairs = self.seq_len * (self.seq_len + 1) / 2
            return 4.0 * self.batch * self.num_heads * self.head_dim * pairs
        elt = torch.empty(0, dtype=self.dtype).element_size()
        if is_kivi(kv_format):  # Q tokens' packed codes and fp16 meta (D / 8 bytes), the rest dense
            from kvflow.attention.kivi import KIVI_FORMATS, quantised_length

            q = quantised_length(self.seq_len - 1, KIVI_BENCH_RESIDUAL)
            per_token = self.head_dim * KIVI_FORMATS[kv_format] // 8 + self.head_dim // 8
            per_head = (q * per_token + (self.seq_len - q) * self.head_dim * elt) / self.seq_len
        else:
            per_head = {"int8": self.head_dim + 4, "fp8_e4m3": self.head_dim}.get(kv_format, self.head_dim * elt)
        return 2.0 * self.batch * self.seq_len * self.num_kv_heads * per_head

    def kivi_applies(self) -> bool:
        """Whether the KIVI implementations run on this case: decode, block size and head_dim multiples of 32."""
        return self.kind == "decode" and self.block_size % 32 == 0 and self.head_dim % 32 == 0

    def kivi_state(self, kv_format: str) -> KiviState:
        """The decode case's context [0, n - 1) stored as `--kv-cache-dtype kv_format` (kivi4 / kivi2)
        stores a prompt of that length (kivi.store_kivi: groups below Q quantised into the case's
        blocks, the rest in ring slot b of sequence b), and the decode step of each query at n - 1."""
        key = ("kivi", kv_format)
        if key not in self._quantised:
            from kvflow.attention.kivi import KIVI_FORMATS, KiviStep, meta_width, store_kivi

            if not self.kivi_applies():
                raise ValueError("KIVI needs a decode case with block size and head_dim multiples of 32")
            bits, residual = KIVI_FORMATS[kv_format], KIVI_BENCH_RESIDUAL
            b, n, bs, kvh, d = self.batch, self.seq_len, self.block_size, self.num_kv_heads, self.head_dim
            num_blocks = self.kv_cache.shape[1]
            codes = torch.zeros(2, num_blocks, kvh, bs, d * bits // 8, dtype=torch.uint8, device=self.device)
            meta = torch.zeros(2, num_blocks, kvh, bs, meta_width(d), dtype=torch.float16, device=self.device)
            ring = torch.zeros(2, b, kvh, residual + 32, d, dtype=self.dtype, device=self.device)
            cache = (codes, meta, ring)
            tables = self.block_tables.tolist()
            if n > 1:  # the context as one prompt chunk per sequence
                prompt = KiviStep.build(bits, residual, bs, list(range(b)), [0] * b, [n - 1] * b, [0] * b,
                                        [i * (n - 1) for i in range(b)], tables, self.device)
                k, v = (x[:, :, :n - 1].transpose(1, 2).reshape(-1, kvh, d) for x in (self.keys, self.values))
                store_kivi(cache, k, v, prompt, bs)
            step = KiviStep.build(bits, residual, bs, list(range(b)), [n - 1] * b, [n] * b, [0] * b, list(range(b)),
                                  tables, self.device)
            own = self.keys[:, :, n - 1].contiguous(), self.values[:, :, n - 1].contiguous()
            self._quantised[key] = KiviState(cache, step, *own)
        return self._quantised[key]

    def quantised_cache(self, kv_format: str) -> tuple[torch.Tensor, ...]:
        """The paged cache as `--kv-cache-dtype kv_format` stores it: (codes, scales); KIVI: (codes,
        meta, ring) before the decode step (`kivi_state`)."""
        if is_kivi(kv_format):
            return self.kivi_state(kv_format).cache
        if kv_format not in self._quantised:
            from kvflow.attention.kv_quant import calibrate_fp8, quantize_fp8, quantize_int8

            if kv_format == "int8":
                self._quantised[kv_format] = quantize_int8(self.kv_cache)
            else:  # per-head scales calibrated on the whole cache, as on a first prompt
                head_scales = torch.zeros(2, self.num_kv_heads, 1, device=self.device)
                keys, values = (self.kv_cache[i].transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
                                for i in (0, 1))
                calibrate_fp8(head_scales, keys, values)
                codes = torch.stack([quantize_fp8(self.kv_cache[i].transpose(1, 2), head_scales[i]).transpose(1, 2)
                                     for i in (0, 1)])
                self._quantised[kv_format] = (codes, head_scales)
        return self._quantised[kv_format]

    def quantised_reference(self, kv_format: str) -> torch.Tensor:
        """`naive` over the dequantised cache: what a kernel reading `kv_format` must compute."""
        if is_kivi(kv_format):
            return self._kivi_reference(kv_format)
        codes, scales = self.quantised_cache(kv_format)
        if kv_format == "fp8_e4m3":
            scales = scales[:, None, :, None, :]  # [2, 1, KVH, 1, 1]: broadcast over blocks and slots
        blocks = self.block_tables.flatten()
        kv = codes[:, blocks].float() * (scales[:, blocks] if kv_format == "int8" else scales)
        b, per_seq = self.block_tables.shape
        kv = kv.view(2, b, per_seq, self.num_kv_heads, self.block_size, self.head_dim).permute(0, 1, 3, 2, 4, 5)
        kv = kv.reshape(2, b, self.num_kv_heads, per_seq * self.block_size, self.head_dim)[:, :, :, :self.seq_len]
        return _naive(self, kv[0], kv[1])

    def _kivi_reference(self, kv_format: str) -> torch.Tensor:
        """`naive` over the context a KIVI decode reads: positions below Q dequantised
        (kivi.dequantize_blocks), the ring's and the query's own as they are."""
        from kvflow.attention.kivi import dequantize_blocks

        state = self.kivi_state(kv_format)
        codes, meta, _ = state.cache
        q_len = state.step.quantised_list[0]  # every sequence has the same length
        b, per_seq = self.block_tables.shape
        halves = []
        for half, dense in ((0, self.keys), (1, self.values)):
            deq = dequantize_blocks(codes[half][self.block_tables], meta[half][self.block_tables], state.step.bits,
                                    half, self.dtype)  # [B, nb, KVH, bs, D]
            deq = deq.transpose(1, 2).reshape(b, self.num_kv_heads, per_seq * self.block_size, self.head_dim)
            halves.append(torch.cat([deq[:, :, :q_len], dense[:, :, q_len:]], dim=2))
        return _naive(self, *halves)

    @functools.cached_property
    def quest_bounds(self) -> torch.Tensor:
        """Every block's key min/max [blocks, KVH, 2, D], as the engine keeps them beside the cache."""
        return torch.stack([self.kv_cache[0].amin(2), self.kv_cache[0].amax(2)], dim=2)

    def quest_blocks(self, select_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Quest's choice for each decode query: the reduced block tables and their context lengths
        (the first block, the query's own and the best others, `quest_budget` tokens in all), chosen
        by `select_fn` (default: kv_policy_ops.quest_select, PyTorch)."""
        from kvflow.attention.kv_policy_ops import quest_select

        b, bs = self.batch, self.block_size
        read = max(2, self.quest_budget // bs)
        tables, lens = (select_fn or quest_select)(self.q, self.quest_bounds, self.block_tables, [self.seq_len] * b,
                                                   [read] * b, [1] * b, [1] * b, bs, self.scale)
        return tables, torch.tensor(lens, dtype=torch.long, device=self.device)

    def quest_reference(self) -> torch.Tensor:
        """`naive` over only the blocks Quest chooses: what a kernel reading them must compute."""
        tables, lens = self.quest_blocks()
        n = int(lens.max())
        kv = self.kv_cache[:, tables].permute(0, 1, 3, 2, 4, 5).reshape(2, self.batch, self.num_kv_heads, -1,
                                                                         self.head_dim)
        group = self.num_heads // self.num_kv_heads
        q = self.heads_first().float()
        k, v = (kv[i, :, :, :n].float().repeat_interleave(group, dim=1) for i in (0, 1))
        scores = (q @ k.transpose(-1, -2)) * self.scale
        visible = torch.arange(n, device=self.device)[None, :] < lens[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        return (scores.softmax(-1) @ v).to(self.dtype).transpose(1, 2).reshape(self.q.shape)

    def quest_work(self) -> float:
        """Bytes a Quest decode reads: the chosen blocks' K and V, and every block's key bounds."""
        elt = torch.empty(0, dtype=self.dtype).element_size()
        nb = math.ceil(self.seq_len / self.block_size)
        read = min(self.seq_len, max(2, self.quest_budget // self.block_size) * self.block_size)
        return self.batch * self.num_kv_heads * self.head_dim * elt * (2.0 * read + 2.0 * nb)

    @functools.cached_property
    def keys_per_query_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V repeated to [B, H, n, D] (built once), for kernels without GQA support."""
        group = self.num_heads // self.num_kv_heads
        return self.keys.repeat_interleave(group, dim=1), self.values.repeat_interleave(group, dim=1)

    def heads_first(self) -> torch.Tensor:
        """q as [B, H, q_len, D] for SDPA and the naive reference."""
        return self.q.view(self.batch, self.q_len, self.num_heads, self.head_dim).transpose(1, 2)


def _naive(case: AttentionCase, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 softmax(QKᵀ)V over `keys`/`values` [B, KVH, n, D] (default: the case's own)."""
    group = case.num_heads // case.num_kv_heads
    q = case.heads_first().float()
    k = (case.keys if keys is None else keys).float().repeat_interleave(group, dim=1)
    v = (case.values if values is None else values).float().repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * case.scale
    if case.kind == "prefill":
        n = case.seq_len
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.to(case.dtype).transpose(1, 2).reshape(case.q.shape)


def _sdpa(case: AttentionCase) -> torch.Tensor:
    causal = case.kind == "prefill"
    if case.device.type == "cuda" and case.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        keys, values = case.keys_per_query_head
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the baseline named by the kernels' goal
            out = F.scaled_dot_product_attention(case.heads_first(), keys, values, scale=case.scale, is_causal=causal)
    else:
        out = F.scaled_dot_product_attention(case.heads_first(), case.keys, case.values, scale=case.scale,
                                             is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).reshape(case.q.shape)


Implementation = Callable[[AttentionCase], torch.Tensor]  # one attention call on a case


def _kvflow_cpu() -> Implementation | None:
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    if ext is None:
        return None
    return lambda c: ext.paged_attention(c.q, c.kv_cache, c.block_tables, c.seq_index, c.positions, c.scale, 0)


def _kvflow_cpu_quantised(kv_format: str) -> Implementation | None:
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    if ext is None:
        return None

    def run(c: AttentionCase) -> torch.Tensor:
        codes, scales = c.quantised_cache(kv_format)
        return ext.paged_attention(c.q, codes, c.block_tables, c.seq_index, c.positions, c.scale, 0, kv_scales=scales)

    return run


def _kvflow_cpu_kivi(kv_format: str) -> Implementation | None:
    from kvflow.model.cpu_kernels import kivi_step_tensors, load_extension

    ext = load_extension()
    if ext is None:
        return None

    def run(c: AttentionCase) -> torch.Tensor:
        state = c.kivi_state(kv_format)
        step = kivi_step_tensors(state.step, c.query_start_loc)
        return ext.kivi_attention(c.q, *state.cache, state.k, state.v, c.block_tables, c.seq_index, c.positions, step,
                                  state.step.bits, c.scale, 0)

    return run


def _kvflow_cpu_quest() -> Implementation | None:
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    if ext is None:
        return None

    from kvflow.model.cpu_kernels import quest_select_cpp

    def run(c: AttentionCase) -> torch.Tensor:
        tables, lens = c.quest_blocks(functools.partial(quest_select_cpp, ext))
        return ext.paged_attention(c.q, c.kv_cache, tables, c.seq_index, lens - 1, c.scale, 0)

    return run


def _triton_quest() -> Implementation:
    from kvflow.attention.triton import decode_attention

    def run(c: AttentionCase) -> torch.Tensor:
        tables, lens = c.quest_blocks()
        return decode_attention(c.q, c.kv_cache, lens, tables, c.scale)[0]

    return run


def _triton_kivi(kv_format: str) -> Implementation:
    from kvflow.attention.triton.kivi import kivi_decode_attention

    def run(c: AttentionCase) -> torch.Tensor:
        state = c.kivi_state(kv_format)
        step = state.step
        return kivi_decode_attention(c.q, state.k, state.v, state.cache, step.bits, c.seq_lens, step.quantised,
                                     step.slots, c.block_tables, c.scale, max_seq_len=c.seq_len)[0]

    return run


def _triton(num_splits: int | None, kv_format: str | None = None) -> Implementation:
    from kvflow.attention.triton import decode_attention, prefill_attention

    def run(c: AttentionCase) -> torch.Tensor:
        cache = c.kv_cache if kv_format is None else c.quantised_cache(kv_format)
        if c.kind == "decode":
            return decode_attention(c.q, cache, c.seq_lens, c.block_tables, c.scale, num_splits=num_splits)[0]
        return prefill_attention(c.q, cache, c.query_start_loc, c.seq_lens, c.block_tables, c.scale)[0]

    return run


def available(device: torch.device, names: tuple[str, ...] = IMPLEMENTATIONS) -> dict[str, Implementation]:
    """The implementations of `names` that run on `device`."""
    impls: dict[str, Implementation] = {}
    for name in names:
        if name == "kvflow-cpu" and device.type == "cpu" and (fn := _kvflow_cpu()) is not None:
            impls[name] = fn
        elif name == "kvflow-cpu-quest" and device.type == "cpu" and (fn := _kvflow_cpu_quest()) is not None:
            impls[name] = fn
        elif name == "triton-quest" and device.type == "cuda":
            impls[name] = _triton_quest()
        elif (name.startswith("kvflow-cpu-") and device.type == "cpu" and is_kivi(fmt := quantised_format(name))
              and (fn := _kvflow_cpu_kivi(fmt)) is not None):
            impls[name] = fn
        elif (name.startswith("kvflow-cpu-") and device.type == "cpu" and (fmt := quantised_format(name))
              and (fn := _kvflow_cpu_quantised(fmt)) is not None):
            impls[name] = fn
        elif name in ("triton", "triton-nosplit") and device.type == "cuda":
            impls[name] = _triton(None if name == "triton" else 1)
        elif name.startswith("triton-") and device.type == "cuda" and is_kivi(fmt := quantised_format(name)):
            impls[name] = _triton_kivi(fmt)
        elif name.startswith("triton-") and device.type == "cuda" and (fmt := quantised_format(name)):
            impls[name] = _triton(None, fmt)
        elif name == "sdpa":
            impls[name] = _sdpa
        elif name == "naive":
            impls[name] = _naive
    return impls


@dataclass
class AttentionResult:
    implementation: str
    kind: str
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    ms: float  # median of the repeats
    tflops: float | None  # prefill
    gbs: float | None  # decode
    max_abs_err: float | None  # against naive, else sdpa
    reference: str | None
    peak_extra_mib: float | None = None  # CPU, --memory: peak RSS the call adds over its inputs


def _time(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls; the caller has made the first (compilation, first-touch)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(case: AttentionCase, impls: dict[str, Implementation], repeats: int,
             naive_max_len: int, memory: bool = False) -> list[AttentionResult]:
    """Time every implementation on one case and check it against the reference; with `memory`
    (CPU), also measure the peak memory each call adds."""
    todo = {n: f for n, f in impls.items() if (n != "naive" or case.seq_len <= naive_max_len)
            and (not n.endswith("-quest") or case.kind == "decode")
            and (not is_kivi(quantised_format(n)) or case.kivi_applies())}
    reference_name = "naive" if "naive" in todo else ("sdpa" if "sdpa" in todo else None)
    # Each implementation's first call gives its output and is the timing's warm-up.
    outputs = {reference_name: todo[reference_name](case)} if reference_name else {}
    reference = outputs[reference_name].float() if reference_name else None
    results = []
    for name, fn in todo.items():
        kv_format = quantised_format(name)
        out = outputs[name] if name in outputs else fn(case)
        if kv_format is not None:  # against its own dequantised cache, where naive runs at all
            expected = case.quantised_reference(kv_format) if case.seq_len <= naive_max_len else None
        elif name.endswith("-quest"):  # against attention over the blocks it chose
            expected = case.quest_reference() if case.seq_len <= naive_max_len else None
        else:
            expected = reference
        err = None if expected is None else float((out.float() - expected).abs().max())
        seconds = _time(lambda fn=fn: fn(case), case.device, repeats)
        work = case.quest_work() if name.endswith("-quest") else case.work(kv_format)
        results.append(AttentionResult(
            implementation=name, kind=case.kind, batch=case.batch, seq_len=case.seq_len,
            num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
            dtype=str(case.dtype).removeprefix("torch."), ms=seconds * 1e3,
            tflops=work / seconds / 1e12 if case.kind == "prefill" else None,
            gbs=work / seconds / 1e9 if case.kind == "decode" else None,
            max_abs_err=err, reference=None if name == reference_name or err is None else "naive",
            peak_extra_mib=peak_extra_mib(case, name) if memory and case.device.type == "cpu" else None,
        ))
    return results


def _peak_rss_of_call(case_args: dict, name: str, queue: multiprocessing.Queue) -> None:
    """Child process: build the case, then report how far one call raises the peak RSS (MiB)."""
    from kvflow.bench.throughput import peak_rss_mib, reset_peak_rss

    case = AttentionCase(**case_args)
    fn = available(case.device, (name,))[name]
    fn(case)  # first call: one-time costs (the C++ extension's load, thread pools)
    reset_peak_rss()  # building the case peaked above the inputs it keeps
    before = peak_rss_mib()
    fn(case)
    queue.put(peak_rss_mib() - before)


def peak_extra_mib(case: AttentionCase, name: str) -> float:
    """Peak memory one call of `name` adds on top of its inputs (and its own first call), measured
    in a fresh process so that no other case's allocations are counted; CPU only."""
    case_args = {f: getattr(case, f) for f in ("kind", "batch", "seq_len", "num_heads", "num_kv_heads",
                                               "head_dim", "block_size", "dtype", "device")}
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_of_call, args=(case_args, name, queue))
    proc.start()
    try:
        value = queue.get(timeout=600)
    finally:
        proc.join()
    return float(value)


@dataclass
class SharedPrefixCase:
    """Decode over `batch` sequences in groups of `group_size` that share `shared_tokens` of prefix
    (whole blocks, the same physical ones, as prefix caching leaves them), each followed by its own
    keys: `own_min` to `own_max` tokens, spread evenly over a group. What shared-prefix attention
    saves: the same kernel with the groups shared_prefix.py finds and without them."""

    batch: int
    group_size: int
    shared_tokens: int
    own_min: int
    own_max: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        from kvflow.attention.shared_prefix import find_shared_prefixes

        if self.shared_tokens % self.block_size or self.group_size < 2 or self.own_min < 1:
            raise ValueError("a shared prefix of whole blocks, groups of >= 2 and >= 1 own token each")
        gen = torch.Generator().manual_seed(0)
        bs, g = self.block_size, self.group_size
        owns = [self.own_min + (self.own_max - self.own_min) * (i % g) // max(1, g - 1) for i in range(self.batch)]
        self.seq_lens = [self.shared_tokens + n for n in owns]
        shared_blocks, own_blocks = self.shared_tokens // bs, [-(-n // bs) for n in owns]
        num_blocks = -(-self.batch // g) * shared_blocks + sum(own_blocks)
        order = iter(torch.randperm(num_blocks, generator=gen).tolist())
        tables: list[list[int]] = []
        for i, n in enumerate(own_blocks):
            prefix = [next(order) for _ in range(shared_blocks)] if i % g == 0 else tables[i - 1][:shared_blocks]
            tables.append(prefix + [next(order) for _ in range(n)])
        width = max(len(t) for t in tables)
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=self.device)
        self.kv_cache = torch.randn(2, num_blocks, self.num_kv_heads, bs, self.head_dim,
                                    generator=gen).to(self.dtype).to(self.device)
        self.q = torch.randn(self.batch, self.num_heads, self.head_dim, generator=gen).to(self.dtype).to(self.device)
        self.positions = torch.tensor(self.seq_lens, device=self.device) - 1
        self.seq_index = torch.arange(self.batch, device=self.device)
        self.groups = find_shared_prefixes(tables, self.seq_lens, self.batch, bs, self.device)

    def reference(self) -> torch.Tensor:
        """fp32 attention of each query over its sequence's keys, gathered through its table."""
        out = torch.empty(self.q.shape, dtype=torch.float32, device=self.device)
        group = self.num_heads // self.num_kv_heads
        for b, n in enumerate(self.seq_lens):
            blocks = self.block_tables[b, : -(-n // self.block_size)]
            k, v = (self.kv_cache[i][blocks].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[:, :n]
                    .float().repeat_interleave(group, 0) for i in (0, 1))
            scores = (self.q[b].float()[:, None] @ k.transpose(1, 2))[:, 0] * self.head_dim**-0.5
            out[b] = (scores.softmax(-1)[:, None] @ v)[:, 0]
        return out

    def kv_bytes(self) -> float:
        """K and V bytes of every sequence's context, as if each read its own (the work both
        implementations do; the shared one reads fewer)."""
        elt = torch.empty(0, dtype=self.dtype).element_size()
        return 2.0 * sum(self.seq_lens) * self.num_kv_heads * self.head_dim * elt


def shared_prefix_implementations(device: torch.device) -> dict[str, Callable[[SharedPrefixCase], torch.Tensor]]:
    """Each decode kernel of `device` without the case's groups and with them ("-shared")."""
    if device.type == "cuda":
        from kvflow.attention.triton import decode_attention

        def triton(c: SharedPrefixCase, shared: bool) -> torch.Tensor:
            return decode_attention(c.q, c.kv_cache, c.positions + 1, c.block_tables, c.head_dim**-0.5,
                                    max_seq_len=max(c.seq_lens), shared=c.groups if shared else None)[0]

        return {"triton": lambda c: triton(c, False), "triton-shared": lambda c: triton(c, True)}
    from kvflow.model.cpu_kernels import load_extension

    ext = load_extension()
    if ext is None:
        return {}

    def cpu(c: SharedPrefixCase, shared: bool) -> torch.Tensor:
        groups = {"shared_groups": c.groups.groups, "shared_members": c.groups.members} if shared else {}
        return ext.paged_attention(c.q, c.kv_cache, c.block_tables, c.seq_index, c.positions, c.head_dim**-0.5, 0,
                                   **groups)

    return {"kvflow-cpu": lambda c: cpu(c, False), "kvflow-cpu-shared": lambda c: cpu(c, True)}


def run_shared_prefix_case(case: SharedPrefixCase, repeats: int) -> list[AttentionResult]:
    """Time the decode kernels with and without the case's groups; each result's error is against the
    fp32 reference, its GB/s the case's whole contexts per second (n: the longest context)."""
    reference = case.reference()
    results = []
    for name, fn in shared_prefix_implementations(case.device).items():
        err = float((fn(case).float() - reference).abs().max())
        seconds = _time(lambda fn=fn: fn(case), case.device, repeats)
        results.append(AttentionResult(
            implementation=name, kind="decode", batch=case.batch, seq_len=max(case.seq_lens),
            num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
            dtype=str(case.dtype).removeprefix("torch."), ms=seconds * 1e3, tflops=None,
            gbs=case.kv_bytes() / seconds / 1e9, max_abs_err=err, reference="fp32",
        ))
    return results


def format_results(results: list[AttentionResult]) -> str:
    head = (f"{'kind':<8} {'impl':<17} {'B':>3} {'n':>6} {'H/KVH':>6} {'D':>4} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} "
            f"{'max err':>9} {'+MiB':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        tf = f"{r.tflops:.3f}" if r.tflops is not None else "-"
        gb = f"{r.gbs:.1f}" if r.gbs is not None else "-"
        err = f"{r.max_abs_err:.2e}" if r.max_abs_err is not None else "-"
        mem = f"{r.peak_extra_mib:.1f}" if r.peak_extra_mib is not None else "-"
        lines.append(f"{r.kind:<8} {r.implementation:<17} {r.batch:>3} {r.seq_len:>6} "
                     f"{f'{r.num_heads}/{r.num_kv_heads}':>6} {r.head_dim:>4} {r.ms:>9.3f} {tf:>8} {gb:>7} "
                     f"{err:>9} {mem:>8}")
    return "\n".join(lines)


def save_results(results: list[AttentionResult], path: Path, device: torch.device) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    payload = {"kind": "attention", "device": device_name, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=1))


# The Triton kernels' goals, checked on a GPU run by `kvflow bench attention --check-targets`.
PREFILL_MAX_SLOWDOWN = 1.3  # prefill time at most 1.3x SDPA's flash backend ...
PREFILL_FROM_LEN = 4096  # ... from 4k tokens
DECODE_FROM_LEN = 8192  # flash-decoding (split) faster than one split from 8k keys
QUANTISED_DECODE_SPEEDUP = 1.5  # int8 / fp8 KV decode at least 1.5x faster than the dense cache from 8k keys
QUEST_DECODE_SPEEDUP = 3.0  # Quest at a 1,024-token budget at least 3x faster than reading all of 8k+ keys
MAX_ABS_ERR = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}  # vs the fp32 reference, outputs ~1


@dataclass
class TargetCheck:
    claim: str
    passed: bool
    detail: str


def check_targets(results: list[AttentionResult]) -> list[TargetCheck]:
    """Every Triton result is accurate; Triton prefill is within PREFILL_MAX_SLOWDOWN of SDPA from
    PREFILL_FROM_LEN tokens; split decode beats non-split from DECODE_FROM_LEN keys; int8 / fp8
    decode is QUANTISED_DECODE_SPEEDUP faster than dense from DECODE_FROM_LEN keys. Only the
    shapes the run measured are checked; a run without Triton results checks nothing."""
    def shape(r: AttentionResult) -> tuple:
        return (r.kind, r.batch, r.seq_len, r.num_heads, r.num_kv_heads, r.head_dim, r.dtype)

    by_impl = {(r.implementation, shape(r)): r for r in results}
    checks = []
    for r in results:
        if not r.implementation.startswith("triton"):
            continue
        where = f"{r.kind} B={r.batch} n={r.seq_len} H/KVH={r.num_heads}/{r.num_kv_heads} D={r.head_dim} {r.dtype}"
        if r.max_abs_err is not None:
            tol = MAX_ABS_ERR[r.dtype]
            checks.append(TargetCheck(f"{r.implementation} {where}: matches {r.reference}", r.max_abs_err <= tol,
                                      f"max abs err {r.max_abs_err:.2e} (limit {tol:.0e})"))
        if r.implementation == "triton-quest" and r.seq_len >= DECODE_FROM_LEN:
            dense = by_impl.get(("triton", shape(r)))
            if dense is not None:
                claim = f"triton-quest {where}: {QUEST_DECODE_SPEEDUP}x faster than reading every block"
                checks.append(TargetCheck(claim, dense.ms >= QUEST_DECODE_SPEEDUP * r.ms,
                                          f"{r.ms:.3f} vs {dense.ms:.3f} ms = {dense.ms / r.ms:.2f}x"))
        if quantised_format(r.implementation) and r.kind == "decode" and r.seq_len >= DECODE_FROM_LEN:
            dense = by_impl.get(("triton", shape(r)))
            if dense is not None:
                claim = f"{r.implementation} {where}: {QUANTISED_DECODE_SPEEDUP}x faster than dense KV"
                checks.append(TargetCheck(claim, dense.ms >= QUANTISED_DECODE_SPEEDUP * r.ms,
                                          f"{r.ms:.3f} vs {dense.ms:.3f} ms = {dense.ms / r.ms:.2f}x"))
        if r.implementation != "triton":
            continue
        sdpa = by_impl.get(("sdpa", shape(r)))
        if r.kind == "prefill" and r.seq_len >= PREFILL_FROM_LEN and sdpa is not None:
            ratio = r.ms / sdpa.ms
            checks.append(TargetCheck(f"triton {where}: within {PREFILL_MAX_SLOWDOWN}x of SDPA",
                                      ratio <= PREFILL_MAX_SLOWDOWN,
                                      f"{r.ms:.3f} vs {sdpa.ms:.3f} ms = {ratio:.2f}x SDPA's time"))
        nosplit = by_impl.get(("triton-nosplit", shape(r)))
        if r.kind == "decode" and r.seq_len >= DECODE_FROM_LEN and nosplit is not None:
            checks.append(TargetCheck(f"triton {where}: split faster than non-split", r.ms < nosplit.ms,
                                      f"{r.ms:.3f} vs {nosplit.ms:.3f} ms = {nosplit.ms / r.ms:.2f}x faster"))
    return checks


def format_checks(checks: list[TargetCheck]) -> str:
    lines = [f"{'PASS' if c.passed else 'FAIL'}  {c.claim}: {c.detail}" for c in checks]
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed}/{len(checks)} target checks passed" if checks else
                 "no target checks apply (the run has no Triton results: they need CUDA)")
    return "\n".join(lines)
